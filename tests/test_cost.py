"""The cost model against figures computed on paper for the tiny random program.

Tiny ViT of intsim.studies.random_program.make_program defaults: 8x8 image, 4x4 patches (4 patch tokens +
class token = 5 tokens), dim 12, 2 heads (width 6), MLP 48, depth 2, 5 classes, W4A4,
residual 16 bits, GELU input 12 bits, accumulator 32, multiplier 32.
"""
import numpy as np

from intsim.studies.cost import program_cost
from intsim.studies.random_program import make_program


def test_tiny_program_counts_by_hand():
    cost = program_cost(make_program(np.random.default_rng(0)))["total"]
    # patch embedding: 4 patches x 12 outputs x 48 inputs (3*4*4), 8-bit pixels x 4-bit weights
    patch = 4 * 12 * 48
    # per block: q, k, v, proj 5x12x12 each; fc1 5x48x12; fc2 5x12x48; 4-bit codes x 4-bit weights
    block_linear = 4 * 5 * 12 * 12 + 5 * 48 * 12 + 5 * 12 * 48
    head = 1 * 5 * 12
    # attention per block: scores 2 heads x 5 x 5 x 6 (4x4 bits) and probs x V (17-bit table x 4-bit)
    scores = pv = 2 * 5 * 5 * 6
    assert cost["macs_by_width"] == {"8x4": patch, "4x4": 2 * block_linear + head + 2 * scores, "17x4": 2 * pv}
    assert cost["macs"] == 20844
    assert cost["bops"] == patch * 32 + (2 * block_linear + head + 2 * scores) * 16 + 2 * pv * 68 == 401568
    # packed weights: N*K*4 bits + per output channel 4 (zero point) + 32 (mult) + 6 (shift) + 32 (bias)
    per_ch = 4 + 32 + 6 + 32
    linear_bits = lambda n, k: n * k * 4 + n * per_ch
    expect = (linear_bits(12, 48) + 2 * (4 * linear_bits(12, 12) + linear_bits(48, 12) + linear_bits(12, 48))
              + linear_bits(5, 12))
    assert cost["weight_bits"] == expect == 33610
    # peak: inside the MLP of block 0: residual (5x12x16) + fc1 output (5x48x12) + GELU codes (5x48x4)
    assert cost["peak_activation_bits"] == 5 * 12 * 16 + 5 * 48 * 12 + 5 * 48 * 4 == 4800
    assert cost["peak_at"] == "blocks.0.mlp.gelu"
