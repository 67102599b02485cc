"""NASWOT: the Hamming kernel, the log-det score, and the codes hooked from modules and fx graphs."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

import zoocompiler.solvers.naswot as naswot_module
from zoocompiler.core.errors import SolverError
from zoocompiler.passes.analysis.preactivations import activation_codes
from zoocompiler.pipelines.assemble.naswot import naswot
from zoocompiler.solvers.naswot import binary_codes, hamming_kernel, naswot_score


def naive_kernel(codes: np.ndarray) -> np.ndarray:
    n, d = codes.shape
    out = np.zeros((n, n))
    for i in range(n):
        for j in range(n):
            out[i, j] = d - sum(int(codes[i, k]) != int(codes[j, k]) for k in range(d))
    return out


def test_hamming_kernel_equals_naive_loop():
    rng = np.random.default_rng(0)
    codes = rng.integers(0, 2, size=(7, 33))
    expected = naive_kernel(codes)
    for variant in (codes, codes.astype(bool), codes.astype(np.float32)):
        kernel = hamming_kernel(variant)
        assert kernel.dtype == np.float64
        np.testing.assert_array_equal(kernel, expected)
    np.testing.assert_array_equal(np.diag(expected), np.full(7, 33.0))


def test_hamming_kernel_is_exact_across_chunks(monkeypatch):
    rng = np.random.default_rng(1)
    codes = rng.integers(0, 2, size=(5, 23)).astype(bool)
    monkeypatch.setattr(naswot_module, "_CHUNK", 4)
    np.testing.assert_array_equal(hamming_kernel(codes), naive_kernel(codes))


def test_hamming_kernel_rejects_non_binary_codes():
    with pytest.raises(ValueError, match="0 and 1"):
        hamming_kernel(np.array([[0, 2], [1, 0]]))
    with pytest.raises(ValueError, match=r"\(N, D\)"):
        hamming_kernel(np.zeros(4))


def test_score_is_log_det_and_minus_inf_for_identical_codes():
    rng = np.random.default_rng(2)
    codes = rng.integers(0, 2, size=(8, 64))
    sign, logdet = np.linalg.slogdet(naive_kernel(codes))
    assert sign == 1
    assert naswot_score(codes) == pytest.approx(logdet, rel=1e-12)
    duplicated = codes.copy()
    duplicated[3] = duplicated[5]
    assert naswot_score(duplicated) == float("-inf")
    assert naswot_score(np.ones((8, 64), dtype=bool)) == float("-inf")


def test_score_grows_as_codes_become_more_distinct():
    rng = np.random.default_rng(3)
    base = rng.integers(0, 2, size=64)
    near = np.tile(base, (8, 1))
    for i in range(1, 8):  # each sample differs from sample 0 in one bit
        near[i, i] ^= 1
    spread = near.copy()
    for i in range(1, 8):  # ... then in 8 bits
        spread[i, 8 * i : 8 * i + 8] ^= 1
    random_codes = rng.integers(0, 2, size=(8, 64))
    scores = [naswot_score(c) for c in (near, spread, random_codes)]
    assert np.isfinite(scores).all()
    assert scores[0] < scores[1] < scores[2]


def test_binary_codes_concatenate_signs_per_sample():
    a = torch.tensor([[1.0, -1.0], [0.0, 2.0]])
    b = torch.tensor([[[-3.0]], [[4.0]]])
    np.testing.assert_array_equal(binary_codes([a, b]), np.array([[1, 0, 0], [0, 1, 1]], dtype=bool))
    with pytest.raises(ValueError, match="batch size"):
        binary_codes([a, torch.zeros(3, 1)])


class SmallCNN(nn.Module):
    """conv → ReLU(inplace) → conv → PReLU(negative slope) → pool → linear → ReLU6."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 4, 3, padding=1)
        self.act1 = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(4, 5, 3, padding=1)
        self.act2 = nn.PReLU(init=-0.5)  # output sign differs from input sign: tells pre- from post-activation
        self.pool = nn.AdaptiveAvgPool2d(2)
        self.fc = nn.Linear(20, 6)
        self.act3 = nn.ReLU6()
        self.bn = nn.BatchNorm1d(6)

    def forward(self, x):
        x = self.act2(self.conv2(self.act1(self.conv1(x))))
        return self.bn(self.act3(self.fc(self.pool(x).flatten(1))))


def test_hooks_capture_exactly_the_pre_activations_of_a_cnn():
    model = SmallCNN()
    x = torch.randn(6, 3, 8, 8)
    with torch.no_grad():
        h1 = model.conv1(x)
        h2 = model.conv2(F.relu(h1))
        h3 = model.fc(model.pool(F.prelu(h2, model.act2.weight)).flatten(1))
    expected = binary_codes([h1, h2, h3])
    assert expected.shape == (6, 4 * 64 + 5 * 64 + 6)
    np.testing.assert_array_equal(activation_codes(model, x), expected)
    # ReLU codes are also the ReLU outputs' signs; the PReLU codes are not its outputs' signs
    assert (binary_codes([F.relu(h1)]) == expected[:, : 4 * 64]).all()
    assert not (binary_codes([F.prelu(h2, model.act2.weight)]) == expected[:, 4 * 64 : 9 * 64]).all()
    assert naswot(model, [x]) == naswot_score(expected)


def test_naswot_leaves_the_model_unchanged_and_averages_batches():
    model = SmallCNN()
    model.train()
    model.bn.eval()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    xs = [torch.randn(6, 3, 8, 8) for _ in range(3)]
    score = naswot(model, xs)
    assert score == pytest.approx(np.mean([naswot_score(activation_codes(model, x)) for x in xs]), rel=1e-12)
    assert model.training and model.conv1.training and not model.bn.training
    assert all(not m._forward_pre_hooks and not m._forward_hooks for m in model.modules())
    for key, value in model.state_dict().items():
        assert torch.equal(value, state[key]), key  # BatchNorm running stats untouched: eval mode


class Functional(nn.Module):
    """The same layers with functional activations (F.relu, torch.relu, x.relu(), F.gelu, F.silu)."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 4, 3, padding=1)
        self.conv2 = nn.Conv2d(4, 4, 3, padding=1)
        self.conv3 = nn.Conv2d(4, 4, 3, padding=1)
        self.fc1 = nn.Linear(16, 8)
        self.fc2 = nn.Linear(8, 5)

    def forward(self, x):
        x = F.relu(self.conv1(x), inplace=True)
        x = torch.relu(self.conv2(x))
        x = self.conv3(x).relu()
        x = F.adaptive_avg_pool2d(x, 2).flatten(1)
        return self.fc2(F.silu(F.gelu(self.fc1(x))))


class Modular(Functional):
    """Functional's layers with activation modules instead."""

    def __init__(self):
        super().__init__()
        self.acts = nn.ModuleList([nn.ReLU(inplace=True), nn.ReLU(), nn.ReLU(), nn.GELU(), nn.SiLU()])

    def forward(self, x):
        x = self.acts[0](self.conv1(x))
        x = self.acts[1](self.conv2(x))
        x = self.acts[2](self.conv3(x))
        x = F.adaptive_avg_pool2d(x, 2).flatten(1)
        return self.fc2(self.acts[4](self.acts[3](self.fc1(x))))


def test_fx_graph_with_functional_activations_equals_the_module_version():
    modular = Modular()
    functional = Functional()
    functional.load_state_dict(modular.state_dict(), strict=False)
    traced = fx.symbolic_trace(functional)
    targets = {n.target for n in traced.graph.nodes if n.op in ("call_function", "call_method")}
    assert {F.relu, torch.relu, "relu", F.gelu, F.silu} <= targets
    x = torch.randn(10, 3, 8, 8)
    codes = activation_codes(traced, x)
    np.testing.assert_array_equal(codes, activation_codes(modular, x))
    assert codes.shape == (10, 3 * 4 * 64 + 8 + 8)
    xs = [x, torch.randn(10, 3, 8, 8)]
    assert naswot(traced, xs) == naswot(modular, xs)
    # a traced module-based model: the activation modules are call_module leaves, hooked once each
    np.testing.assert_array_equal(activation_codes(fx.symbolic_trace(modular), x), codes)
    # eager functional activations are invisible to hooks: an error, not a score of nothing
    with pytest.raises(SolverError, match="trace it with torch.fx"):
        naswot(functional, xs)


@pytest.mark.parametrize(
    ("name", "kwargs"),
    [("vit_tiny_patch16_224", {"img_size": 32, "patch_size": 8, "depth": 2}), ("mobilenetv3_small_050", {})],
)
def test_traced_timm_model_equals_the_module(name, kwargs):
    timm = pytest.importorskip("timm")
    from zoocompiler.passes.analysis import trace

    model = timm.create_model(name, num_classes=5, **kwargs).eval()
    x = torch.randn(4, 3, 32, 32)
    codes = activation_codes(model, x)
    np.testing.assert_array_equal(activation_codes(trace(model, x, analyze=False), x), codes)
    assert codes.shape[1] > 1000


def test_torch_export_graph_equals_the_module_version():
    model = SmallCNN().eval()
    x = torch.randn(6, 3, 8, 8)
    exported = torch.export.export(model, (x,)).module()
    targets = {str(n.target) for n in exported.graph.nodes if n.op == "call_function"}
    assert {"aten.relu_.default", "aten.prelu.default", "aten.hardtanh.default"} <= targets
    np.testing.assert_array_equal(activation_codes(exported, x), activation_codes(model, x))


def test_outputs_layers_use_only_the_model_output():
    model = SmallCNN()
    x = torch.randn(6, 3, 8, 8)
    with torch.no_grad():
        model.eval()
        expected = binary_codes([model(x)])
    np.testing.assert_array_equal(activation_codes(model, x, layers="outputs"), expected)
    with pytest.raises(SolverError, match="layers="):
        naswot(model, [x], layers="all")
    with pytest.raises(SolverError, match="no batches"):
        naswot(model, [])


def test_activation_without_batch_dimension_is_an_error():
    class Folded(nn.Module):
        def __init__(self):
            super().__init__()
            self.act = nn.ReLU()

        def forward(self, x):
            return self.act(x.reshape(-1, x.shape[-1]))

    with pytest.raises(SolverError, match="batch dimension 4"):
        naswot(Folded(), [torch.randn(4, 3, 5)])


class _FunctionalBlock(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(6, 6)

    def forward(self, x):
        return F.gelu(self.lin(x))


def test_graph_modules_nested_in_a_plain_module_report_their_functional_activations():
    """An assembly is a Sequential of block GraphModules: their F.gelu calls must add codes too."""
    torch.manual_seed(0)
    a, b = fx.symbolic_trace(_FunctionalBlock()), fx.symbolic_trace(_FunctionalBlock())
    x = torch.randn(8, 6)
    codes = activation_codes(nn.Sequential(a, b), x)
    with torch.no_grad():
        pre_a = a.lin(x)
        pre_b = b.lin(F.gelu(pre_a))
    np.testing.assert_array_equal(codes, torch.cat([pre_a > 0, pre_b > 0], dim=1).numpy())
    assert "forward" not in vars(a) and "forward" not in vars(b)  # the instance patch is removed again
