"""Deterministic synthetic videos: a textured background, moving coloured squares, pixel noise."""
from __future__ import annotations

from pathlib import Path

import numpy as np


def make_video(num_frames: int = 16, height: int = 360, width: int = 480, seed: int = 0) -> np.ndarray:
    """[T, H, W, 3] uint8 RGB. Different seeds give different colours, paths and textures;
    consecutive frames share most pixels (temporal redundancy, what TTM exploits)."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:height, 0:width]
    phase = rng.uniform(0, 2 * np.pi, size=3)
    freq = rng.uniform(0.01, 0.05, size=3)
    base = np.stack([127 + 100 * np.sin(freq[c] * (xx + yy * (c - 1)) + phase[c]) for c in range(3)], axis=-1)
    objects = [
        dict(size=int(rng.integers(height // 8, height // 3)), colour=rng.integers(0, 256, size=3),
             start=rng.uniform(0, 1, size=2), velocity=rng.uniform(-0.06, 0.06, size=2))
        for _ in range(int(rng.integers(1, 4)))
    ]
    frames = np.empty((num_frames, height, width, 3), dtype=np.uint8)
    for t in range(num_frames):
        frame = base.copy()
        for obj in objects:
            s = obj["size"]
            y, x = ((obj["start"] + t * obj["velocity"]) % 1.0) * [height - s, width - s]
            frame[int(y):int(y) + s, int(x):int(x) + s] = obj["colour"]
        frame += rng.normal(0, 4, size=frame.shape)
        frames[t] = np.clip(frame, 0, 255).astype(np.uint8)
    return frames


def write_mp4(frames: np.ndarray, path: str | Path, fps: float = 8.0) -> Path:
    """Write [T, H, W, 3] RGB frames as an mp4 (mp4v) that vLLM's OpenCV loader reads."""
    return _write(frames, path, "mp4v", fps)


def write_lossless(frames: np.ndarray, path: str | Path, fps: float = 8.0) -> Path:
    """Write [T, H, W, 3] RGB frames as an FFV1 .avi: lossless (decoded pixels equal ``frames``),
    read by vLLM's OpenCV loader as any video file."""
    return _write(frames, path, "FFV1", fps)


def _write(frames: np.ndarray, path: str | Path, codec: str, fps: float) -> Path:
    import cv2

    path = Path(path)
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*codec), fps, (frames.shape[2], frames.shape[1]))
    for frame in frames:
        writer.write(cv2.cvtColor(frame, cv2.COLOR_RGB2BGR))
    writer.release()
    return path


def text_prompt(tokenizer, question: str) -> str:
    """A chat prompt without any video."""
    messages = [{"role": "user", "content": [{"type": "text", "text": question}]}]
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


def chat_prompt(tokenizer_or_processor, question: str = "Describe what happens in this video.") -> str:
    messages = [{"role": "user", "content": [{"type": "video"}, {"type": "text", "text": question}]}]
    return tokenizer_or_processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


def read_video(path: str | Path) -> np.ndarray:
    """Every frame of a video file as [T, H, W, 3] uint8 RGB, decoded by OpenCV as vLLM does."""
    import cv2

    cap = cv2.VideoCapture(str(path))
    frames = []
    while True:
        ok, frame = cap.read()
        if not ok:
            break
        frames.append(cv2.cvtColor(frame, cv2.COLOR_BGR2RGB))
    cap.release()
    if not frames:
        raise ValueError(f"no frames could be decoded from {path}")
    return np.stack(frames)
