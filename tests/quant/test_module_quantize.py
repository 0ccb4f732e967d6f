"""sensq.quantize_ on any nn.Module (torchao's quantize_, ModelOpt's mtq.quantize with a forward loop): the plan's
rules under an expert name, calibration on the inputs a forward loop feeds, the same quantization as apply-plan."""

import pytest
import torch

import sensq
from sensq.errors import InputError
from sensq.plan import Plan, Rule
from sensq.quant import QuantLinear


def _mlp() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(64, 128), torch.nn.GELU(), torch.nn.Linear(128, 64))


def _loop(batches):
    def run(module):
        for x in batches:
            module(x)
    return run


BATCHES = [torch.randn(16, 64, generator=torch.Generator().manual_seed(i)) for i in range(3)]


@pytest.mark.parametrize("method", ["mse", "gptq"])
def test_any_module_is_calibrated_on_its_forward_loop(method):
    model = _mlp()
    with torch.no_grad():
        expected = model(BATCHES[0])
    table, calibration = sensq.quantize_(model, Plan([Rule("re:main:.*", "hif4", "hif4")]), calibrate=method,
                                         forward_loop=_loop(BATCHES))
    assert [row.layer for row in table] == ["0", "2"]
    assert isinstance(model[0], QuantLinear) and isinstance(model[2], QuantLinear)
    assert all(c.method == method and c.act_rows == 48 for c in calibration.values())
    if method == "gptq":
        assert all(c.weight_packed is not None for c in calibration.values())  # its codes, stored as they are
    else:
        assert all(c.weight_curve is not None for c in calibration.values())
    with torch.no_grad():
        out = model(BATCHES[0])
    error = float(((out - expected) ** 2).sum() / (expected**2).sum())
    assert 0 < error < 0.05


def test_a_method_that_needs_data_without_a_loop_is_refused_and_nothing_changes():
    model = _mlp()
    with pytest.raises(InputError, match="needs data: pass forward_loop"):
        sensq.quantize_(model, Plan([Rule("re:main:.*", "hif4", "hif4")]), calibrate="mse")
    assert type(model[0]) is torch.nn.Linear


def test_a_layer_the_loop_never_runs_is_refused():
    model = _mlp()
    with pytest.raises(InputError, match="never ran layer '2': it cannot be calibrated"):
        sensq.quantize_(model, Plan([Rule("re:main:.*", "hif4", "hif4")]), calibrate="mse",
                        forward_loop=lambda module: module[0](BATCHES[0]))


def test_a_rule_for_another_expert_is_refused():
    with pytest.raises(InputError, match="match no layer"):
        sensq.quantize_(_mlp(), Plan([Rule("re:main:.*", "hif4", "hif4"), Rule("high:0", None, None)]))


def test_one_expert_quantized_alone_is_what_apply_plan_deploys():
    from sensq.loading import load_model
    from sensq.quant.apply import apply_plan

    plan = Plan([Rule("re:(high|low):blocks\\.0\\..*", None, None), Rule("re:(high|low):.*", "hif4", "hif4")])
    whole = load_model("tiny", torch.device("cpu"), torch.float32)
    apply_plan(whole, plan)
    alone = load_model("tiny", torch.device("cpu"), torch.float32)
    expert = alone.family.expert_module(alone.pipe, "low")
    sensq.quantize_(expert, Plan([Rule("re:low:blocks\\.0\\..*", None, None), Rule("re:low:.*", "hif4", "hif4")]),
                    expert="low")
    deployed = whole.family.expert_module(whole.pipe, "low")
    x = torch.randn(4, 256, generator=torch.Generator().manual_seed(1))
    for name, module in expert.named_modules():
        if isinstance(module, QuantLinear):
            assert torch.equal(module(x[:, : module.in_features]),
                               deployed.get_submodule(name)(x[:, : module.in_features])), name
    assert type(expert.get_submodule("blocks.0.attn1.to_q")) is torch.nn.Linear
