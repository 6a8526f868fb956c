"""A tiny random DiT + VAE in diffusers' layout (no downloads), the pretrained generator that
tests/test_dit.py and tests/test_composed.py sample from."""

from __future__ import annotations

import torch

from oodscale.diffusion.dit import DiTGenerator

DIT_CLASSES = 12  # the generator's own classes; the ID data uses three of them


def tiny_dit(seed: int = 0, classes: int = DIT_CLASSES) -> DiTGenerator:
    """A random DiT (2 blocks, latent 4×8×8, learned sigma) and VAE (÷2): 16×16 RGB images."""
    from diffusers import AutoencoderKL, DiTTransformer2DModel

    torch.manual_seed(seed)
    transformer = DiTTransformer2DModel(
        num_attention_heads=2, attention_head_dim=8, in_channels=4, out_channels=8,
        num_layers=2, sample_size=8, patch_size=2, num_embeds_ada_norm=classes)
    for block in transformer.transformer_blocks:  # adaLN-Zero starts at zero: wake it up
        torch.nn.init.normal_(block.norm1.linear.weight, std=0.2)
    torch.nn.init.normal_(transformer.proj_out_2.weight, std=0.2)
    vae = AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4,
                        down_block_types=("DownEncoderBlock2D",) * 2,
                        up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(8, 16),
                        layers_per_block=1, norm_num_groups=8, sample_size=16)
    return DiTGenerator(transformer, vae)
