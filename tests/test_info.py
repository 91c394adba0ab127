from ringlinear import RingLinearConfig
from ringlinear.info import describe, model_info


def test_mini_counts_match_the_report():
    info = model_info(RingLinearConfig.preset("mini"))
    assert 16.3e9 < info.total_params < 16.5e9  # "16B parameters"
    assert 0.95e9 < info.active_params - info.embedding_params < 0.965e9  # "957M activations"
    assert info.layer_map == "LLLLSLLLLSLLLLSLLLLS"


def test_cache_memory_per_sequence():
    c = RingLinearConfig.preset("mini")
    info = model_info(c)
    assert info.state_bytes_per_sequence == 16 * 16 * 128 * 128 * 4  # 16 linear layers, fp32 [H, D, D]
    assert info.kv_bytes_per_token == 4 * 2 * 4 * 128 * 2  # 4 softmax layers, K and V, 4 heads, bf16
    assert "LLLLSLLLLSLLLLSLLLLS" in describe(c)
