"""The original product document's examples, with the seed's ``model_factory`` import paths
verbatim, on the CPU with a small checkpoint.

Changes from the document's text: device "cpu" and float32 instead of "cuda"/bfloat16 (no GPU in
CI); a converted random ``llava_vit_base_ln`` checkpoint instead of ``/path/to/...`` (the example
uses ``patch_size = 16``, the small/base patch size, but names ``llava_vit_large_ln``, whose patch
size is 14, so that pairing cannot run as printed); and a photo (matplotlib's sample
``grace_hopper.jpg``) and a video panning over it instead of solid colours, which would hide a
patch-order bug (every patch of a solid image is the same).
"""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from conftest import REPO_ROOT


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    """A random source checkpoint and its converted packing folder, made with the seed's script path."""
    import timm

    import llava_vit  # noqa: F401  (registers the timm names)

    folder = tmp_path_factory.mktemp("seed")
    torch.manual_seed(0)
    src = timm.create_model("llava_vit_base_ln", pretrained=False)
    torch.save({"model": src.state_dict()}, folder / "backbone.pt")
    out = folder / "packing"
    result = subprocess.run(
        [sys.executable, "model_factory/convert_llava_vit_packing_to_hf.py", "llava_vit_base_ln",
         str(folder / "backbone.pt"), "--output_dir", str(out), "--no-verify"],
        cwd=REPO_ROOT, capture_output=True, text=True, timeout=600,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    return folder / "backbone.pt", out


@torch.no_grad()
def test_seed_consistency_example(converted):
    import timm
    import torchvision.transforms as T
    from matplotlib import cbook
    from PIL import Image

    from model_factory.convert_llava_vit_packing_to_hf import (
        compute_patch_positions_with_interpolated_temporal,
        interpolate_frame_indices,
    )
    from model_factory.vit_preview_v0_packing_hf import LlavaViTPackingModel, compute_patch_positions_from_grid_thw

    backbone, packing_dir = converted
    device = torch.device("cpu")
    src_model = timm.create_model("llava_vit_base_ln", pretrained=False)
    src_checkpoint = torch.load(backbone, map_location="cpu")
    src_state_dict = src_checkpoint.get("model", src_checkpoint.get("state_dict", src_checkpoint))
    src_model.load_state_dict(src_state_dict, strict=False)
    src_model = src_model.to(device, dtype=torch.float32).eval()
    packing_model = LlavaViTPackingModel.from_pretrained(packing_dir, torch_dtype=torch.float32).to(device).eval()

    patch_size, image_size, num_frames, target_frames = 16, 224, 8, 64
    h_patches = w_patches = image_size // patch_size
    transform = T.Compose([
        T.Resize((image_size, image_size)),
        T.ToTensor(),
        T.Normalize(mean=[0.48145466, 0.4578275, 0.40821073], std=[0.26862954, 0.26130258, 0.27577711]),
    ])

    photo = Image.open(cbook.get_sample_data("grace_hopper.jpg", asfileobj=False)).convert("RGB")
    width, height = photo.size

    # Test 1: image
    image = photo
    image_tensor = transform(image).unsqueeze(0).to(device)
    src_image_feat = src_model(image_tensor)["visible_embeddings"]
    channels = 3
    patches = image_tensor.view(1, channels, h_patches, patch_size, w_patches, patch_size)
    patches = patches.permute(0, 2, 4, 1, 3, 5).contiguous()
    hidden_states = patches.view(h_patches * w_patches, patch_size * patch_size * channels)
    grid_thw = torch.tensor([[1, h_patches, w_patches]], dtype=torch.long, device=device)
    patch_positions = compute_patch_positions_from_grid_thw(grid_thw)
    packing_image_feat = packing_model(hidden_states=hidden_states, grid_thw=grid_thw,
                                       patch_positions=patch_positions).last_hidden_state
    cos_sim = F.cosine_similarity(src_image_feat.flatten(0, -2).float(), packing_image_feat.float(), dim=-1)
    assert cos_sim.min().item() > 0.99
    assert (src_image_feat[0] - packing_image_feat).abs().max() <= 1e-4

    # Test 2: 8-frame video in the 64-frame context
    side = min(width, height) // 2  # a square window panning from the top-left to the bottom-right corner
    video_frames = [photo.crop((x, y, x + side, y + side)) for x, y in
                    ((i * (width - side) // (num_frames - 1), i * (height - side) // (num_frames - 1))
                     for i in range(num_frames))]
    video_tensors = torch.stack([transform(f) for f in video_frames], dim=0)
    video_tensor = video_tensors.unsqueeze(0).permute(0, 2, 1, 3, 4).to(device)
    frame_indices = torch.arange(num_frames).unsqueeze(0).to(device)
    total_frames_tensor = torch.tensor([num_frames]).to(device)
    interpolated_indices = interpolate_frame_indices(frame_indices, total_frames_tensor, target_frames)
    assert interpolated_indices[0].tolist() == [0, 9, 18, 27, 36, 45, 54, 63]
    bs, frame_tokens = 1, h_patches * w_patches
    padded_video = torch.zeros(bs, channels, target_frames, image_size, image_size, device=device, dtype=video_tensor.dtype)
    frame_idx_expanded = interpolated_indices.view(bs, 1, num_frames, 1, 1).expand(
        bs, channels, num_frames, image_size, image_size)
    padded_video.scatter_(dim=2, index=frame_idx_expanded, src=video_tensor)
    per = torch.arange(frame_tokens, device=device)
    visible_index = (interpolated_indices.unsqueeze(-1) * frame_tokens + per).reshape(bs, -1)
    visible_index = visible_index.clamp_max(target_frames * frame_tokens - 1)
    src_video_feat = src_model(padded_video, visible_indices=visible_index, mask_ratio=None)["visible_embeddings"]
    patches = video_tensor.view(bs, channels, num_frames, h_patches, patch_size, w_patches, patch_size)
    patches = patches.permute(0, 2, 3, 5, 1, 4, 6).contiguous()
    hidden_states = patches.view(num_frames * h_patches * w_patches, patch_size * patch_size * channels)
    grid_thw = torch.tensor([[num_frames, h_patches, w_patches]], dtype=torch.long, device=device)
    patch_positions = compute_patch_positions_with_interpolated_temporal(interpolated_indices, h_patches, w_patches, device)
    assert patch_positions[196].tolist() == [9, 0, 0]
    packing_video_feat = packing_model(hidden_states=hidden_states, grid_thw=grid_thw,
                                       patch_positions=patch_positions).last_hidden_state
    cos_sim_video = F.cosine_similarity(src_video_feat.flatten(0, -2).float(), packing_video_feat.float(), dim=-1)
    assert cos_sim_video.min().item() > 0.99
    assert (src_video_feat[0] - packing_video_feat).abs().max() <= 1e-4  # and in fact exact in float32


@torch.no_grad()
def test_seed_quick_start_and_timm_variants():
    import timm

    from model_factory.vit_preview_v0_packing_hf import LlavaViTPackingConfig, LlavaViTPackingModel

    config = LlavaViTPackingConfig(patch_size=16, hidden_size=768, num_attention_heads=12, num_hidden_layers=12,
                                   num_channels=3)
    model = LlavaViTPackingModel(config).eval()
    hidden_states = torch.randn(196, 16 * 16 * 3)
    grid_thw = torch.tensor([[1, 14, 14]], dtype=torch.long)
    outputs = model(hidden_states=hidden_states, grid_thw=grid_thw)
    assert outputs.last_hidden_state.shape == (196, 768)
    with torch.device("meta"):
        for size, width in (("small", 384), ("base", 768), ("large", 1024), ("huge", 1280), ("giant", 1536)):
            assert timm.create_model(f"hf_llava_vit_packing_{size}_ln", pretrained=False).config.hidden_size == width
