"""Encode with Ray Data: a callable class for :meth:`ray.data.Dataset.map_batches`, so a Ray
pipeline can read files from object storage, encode them on a cluster's GPUs and write Parquet.

Ray is not imported here (nor anywhere in llava-vit); install it with ``pip install "llava-vit[ray]"``.
Example (the one in docs/SCALING.md)::

    import ray
    from llava_vit.encoding.ray_data import BatchEncoder

    ds = ray.data.read_binary_files("s3://bucket/images/", include_paths=True)  # columns: bytes, path
    ds = ds.map_batches(
        BatchEncoder,
        fn_constructor_kwargs={"model": "/models/llava_vit_large"},
        batch_size=256,
        num_gpus=1,
        compute=ray.data.ActorPoolStrategy(size=8),  # 8 GPUs; Ray < 2.51 also takes concurrency=8
    )
    ds.write_parquet("s3://bucket/features/")  # columns: path, pooled, grid_thw, error

Each actor loads the model once, reads its batch's rows in threads with the model's processor (the
same reading as ``llava-vit encode``: EXIF orientation, transparency, video frame sampling), packs
them largest first into forward passes of at most ``max_tokens`` tokens, and returns one row per
input row.
"""

from __future__ import annotations

import io
import os
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from ..processing import PackedSample
from ..processing.video import ANIMATED_IMAGE_FORMATS
from ..validation import resolve_device
from .pipeline import check_choice, check_model_name, load_encoder, load_processor, model_dtype_for, pack_window
from .store import SAVE_DTYPES, SAVE_MODES


class BatchEncoder:
    """Rows of image/video bytes or paths in, features out: ``ds.map_batches(BatchEncoder,
    fn_constructor_kwargs={"model": ...}, num_gpus=1, ...)`` (numpy batches, Ray's default).

    A batch must have a ``bytes_column`` (file contents, as ``ray.data.read_binary_files`` gives
    them; the ``path_column``, when present, names each file and gives a video its extension) or a
    ``path_column`` (files every worker can read). The result keeps the batch's other columns and adds

    - ``pooled`` ``(n, D)`` float32: one vector per input (unless ``save="patches"``);
    - ``patch_features``: per input a ``(tokens, D)`` float32 array (with ``save="patches"`` or ``"all"``);
    - ``grid_thw`` ``(n, 3)`` int32: each input's patch grid;
    - ``error``: ``""``, or why the input could not be read; its ``pooled`` row is then NaN and its
      ``grid_thw`` zeros (``ds.filter(lambda row: not row["error"])`` drops such rows).

    ``model``, ``max_tokens``, ``frames``, ``resize_mode``, ``size``, ``min_pixels``, ``max_pixels``,
    ``device`` and ``dtype`` mean what they mean to :func:`~llava_vit.encode_files` (``device``
    defaults to the GPU Ray gives the actor, else the CPU). ``threads`` read rows at once: give the
    actor as many CPUs (``num_cpus``).
    """

    def __init__(self, model: str | os.PathLike, *, save: str = "pooled", max_tokens: int = 16384,
                 frames: int | None = None, resize_mode: str | None = None, size: int | None = None,
                 min_pixels: int | None = None, max_pixels: int | None = None, device: str | None = None,
                 dtype: str | None = None, threads: int = 4, bytes_column: str = "bytes", path_column: str = "path"):
        check_choice("save", save, SAVE_MODES)
        check_choice("dtype", dtype, SAVE_DTYPES, optional=True)
        check_model_name(model)
        processor = load_processor(model, num_frames=frames, resize_mode=resize_mode, size=size,
                                   min_pixels=min_pixels, max_pixels=max_pixels, max_tokens=max_tokens)
        run_device = resolve_device(device)
        self.encoder, self.model_sha256 = load_encoder(model, processor, run_device, model_dtype_for(dtype, run_device))
        self.device, self.save, self.max_tokens = run_device, save, max_tokens
        self.num_frames = frames  # None: the processor's own count (it already holds an override)
        self.bytes_column, self.path_column = bytes_column, path_column
        self.readers = ThreadPoolExecutor(threads)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        if self.bytes_column not in batch and self.path_column not in batch:
            raise KeyError(f"BatchEncoder: a batch needs a {self.bytes_column!r} or a {self.path_column!r} column, "
                           f"got {sorted(batch)}")
        contents = batch.get(self.bytes_column)
        names = batch.get(self.path_column)
        rows = len(contents if contents is not None else names)
        read = list(self.readers.map(
            self._read, [None if contents is None else contents[i] for i in range(rows)],
            [None if names is None else str(names[i]) for i in range(rows)]))
        hidden = self.encoder.model.config.hidden_size
        pooled = np.full((rows, hidden), np.nan, dtype=np.float32)
        patches = [np.zeros((0, hidden), dtype=np.float32) for _ in range(rows)]
        grids = np.zeros((rows, 3), dtype=np.int32)
        samples = [(i, sample) for i, (sample, _) in enumerate(read) if sample is not None]
        for group in pack_window([s.num_tokens for _, s in samples], self.max_tokens):
            items = [samples[g] for g in sorted(group)]
            out = self._forward([s for _, s in items])
            rows_patches = torch.split(out.last_hidden_state.float().cpu(), [s.num_tokens for _, s in items])
            for (i, sample), vector, features in zip(items, out.pooler_output.float().cpu(), rows_patches):
                pooled[i], patches[i], grids[i] = vector.numpy(), features.numpy(), sample.grid_thw
        result = {k: v for k, v in batch.items() if k != self.bytes_column}
        if self.save != "patches":
            result["pooled"] = pooled
        if self.save != "pooled":
            result["patch_features"] = _objects(patches)
        result["grid_thw"] = grids
        result["error"] = np.array([error or "" for _, error in read], dtype=object)
        return result

    def _forward(self, samples: list[PackedSample]):
        model = self.encoder.model
        inputs = self.encoder.processor.pack(samples)
        with torch.inference_mode():
            return model(hidden_states=inputs["hidden_states"].to(self.device, model.dtype),
                         grid_thw=inputs["grid_thw"], patch_positions=inputs["patch_positions"].to(self.device))

    def _read(self, data: bytes | None, name: str | None) -> tuple[PackedSample | None, str | None]:
        """One row's sample, or why it cannot be read (one unreadable row must not stop the batch)."""
        try:
            if data is None:
                return self.encoder.processor.preprocess_file(name, self.num_frames), None
            return self._read_bytes(bytes(data), name), None
        except Exception as error:  # noqa: BLE001 - reported in the row's error column
            return None, f"{type(error).__name__}: {error}"

    def _read_bytes(self, data: bytes, name: str | None) -> PackedSample:
        """A still image is read from memory; anything else is spooled to a temporary file (PyAV reads
        files) with the source's extension and read as that file would be (without a name: as a video)."""
        processor = self.encoder.processor
        image = _still_image(data)
        if image is not None:
            return processor.preprocess_image(image)
        with tempfile.NamedTemporaryFile(suffix=Path(name).suffix if name else "") as spooled:
            spooled.write(data)
            spooled.flush()
            try:
                if name:
                    return processor.preprocess_file(spooled.name, self.num_frames)
                return processor.preprocess_video(spooled.name, self.num_frames)
            except Exception as error:  # noqa: BLE001 - the message names the row, not the temporary file
                raise ValueError(str(error).replace(spooled.name, name or "the row's bytes")) from error


def _still_image(data: bytes) -> Image.Image | None:
    """The picture ``data`` holds when Pillow can read it and it is not an animation, else ``None``."""
    try:
        image = Image.open(io.BytesIO(data))
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError):
        return None
    if image.format in ANIMATED_IMAGE_FORMATS and getattr(image, "is_animated", False):
        return None
    return image


def _objects(arrays: list[np.ndarray]) -> np.ndarray:
    """A 1-D object array holding ``arrays`` (of different lengths), which Ray stores as a ragged tensor column."""
    column = np.empty(len(arrays), dtype=object)
    for i, array in enumerate(arrays):
        column[i] = array
    return column
