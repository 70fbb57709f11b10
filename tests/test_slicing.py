"""tailkd.slicing: the rows a student keeps of its teacher's q/k heads, and the cut. (Every axis kind is tested
through the students it builds: tests/test_student.py, tests/test_student_families.py.)"""

import torch

from tailkd.slicing import each_experts_units, expert_unit_rows, qk_head_rows, rope_pair_rows, take


def test_rope_pair_rows_general():
    assert rope_pair_rows(16, 16) == list(range(16))
    assert rope_pair_rows(64, 32) == [2 * j for j in range(16)] + [32 + 2 * j for j in range(16)]
    rows = rope_pair_rows(64, 48)  # ratio 4/3: nearest teacher pair per student pair
    assert rows[:24] == [(4 * j + 1) // 3 for j in range(24)] and rows[24:] == [32 + i for i in rows[:24]]
    assert len(set(rows)) == 48 and max(rows) < 64


def test_interleaved_pairs_and_partial_rotary_rows():
    # interleaved RoPE (GLM, Llama 4): pair p is rows (2p, 2p + 1); 8 pairs -> 4 keep teacher pairs 0, 2, 4, 6
    assert rope_pair_rows(16, 8, interleaved=True) == [0, 1, 4, 5, 8, 9, 12, 13]
    # half of a 16-row head rotates (rotate-half over rows 0..7: pairs (i, i + 4)); 16 -> 8 keeps pairs 0, 2 of the
    # rotated part (rows 0, 2, 4, 6), then the first 4 non-rotated rows
    assert qk_head_rows(16, 8, True, 0.5) == [0, 2, 4, 6, 8, 9, 10, 11]
    assert qk_head_rows(16, 8, False) == list(range(8))  # no RoPE: a head's first rows


def test_take_cuts_each_leading_dim_by_its_entry():
    x = torch.arange(4 * 5 * 6).reshape(4, 5, 6)
    picked = torch.tensor([3, 0])
    out = take(x, picked, None, 2)  # those indices, all, the first 2
    assert torch.equal(out, x[[3, 0]][:, :, :2])
    assert torch.equal(take(x, lambda n: torch.arange(n - 1, -1, -1)), x.flip(0))  # a function of the dim's size


def test_each_expert_keeps_its_own_units():
    # 2 experts' [E, gate | up, d] (width 3 each) and [E, d, ff]: expert 0 keeps units 2, 0, expert 1 units 1, 2
    gate_up = torch.arange(2 * 6 * 4).reshape(2, 6, 4)
    down = torch.arange(2 * 4 * 3).reshape(2, 4, 3)
    units = torch.tensor([[2, 0], [1, 2]])
    kept = each_experts_units(gate_up, ("expert", "gate_up", "d"), units, 3)
    assert torch.equal(kept[0], gate_up[0, [2, 0, 5, 3]]) and torch.equal(kept[1], gate_up[1, [1, 2, 4, 5]])
    kept = each_experts_units(down, ("expert", "d", "ff"), units, 3)
    assert torch.equal(kept[0], down[0][:, [2, 0]]) and torch.equal(kept[1], down[1][:, [1, 2]])


def test_expert_unit_rows_of_flattened_experts():
    """DBRX's experts as [experts x width, d] tensors (axis ``expert_ff``): of each kept expert, in the student's order,
    its first ``units`` rows."""
    assert expert_unit_rows(2, 3, 5).tolist() == [0, 1, 2, 5, 6, 7]
    assert expert_unit_rows(torch.tensor([3, 1]), 2, 4).tolist() == [12, 13, 4, 5]
