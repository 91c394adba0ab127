"""The launchers' integer helpers against Triton's own (which they replace for host time)."""

import triton

from ringlinear.ops.launch import cdiv, next_power_of_2


def test_cdiv_and_next_power_of_2_match_tritons():
    for a in range(0, 3000, 7):
        for b in (1, 3, 16, 64, 128, 1000):
            assert cdiv(a, b) == triton.cdiv(a, b)
    for n in range(1, 5000):
        assert next_power_of_2(n) == triton.next_power_of_2(n)
    assert next_power_of_2(0) == 1
