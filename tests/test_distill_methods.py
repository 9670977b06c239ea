"""Behaviour every method module shares: input checks, AID weights of 1 change nothing, registry."""
import pytest
import torch

from aidkd.distill import METHODS, DistillInputs, build_method, method_params

SIZES = [(8, 8), (4, 4), (2, 2)]
STRIDES = [8, 16, 32]


def make_inputs(cs=4, ct=6, b=2, sizes=SIZES, strides=STRIDES, **kw):
    g = torch.Generator().manual_seed(0)
    student = [torch.randn(b, cs, h, w, generator=g) for h, w in sizes]
    teacher = [torch.randn(b, ct, h, w, generator=g) for h, w in sizes]
    boxes = [torch.tensor([[4.0, 4.0, 40.0, 30.0], [10.0, 12.0, 14.0, 15.0]]), torch.zeros(0, 4)][:b]
    return DistillInputs(student, teacher, list(strides), boxes, **kw)


def build(name):
    torch.manual_seed(0)
    module = build_method(name, 4, 6, 3)
    module.eval()  # BatchNorm of the non-local blocks: same statistics on every call
    return module


def evaluate(module, inputs):
    return {k: v.detach() for k, v in module(inputs).items()}


@pytest.mark.parametrize("name", sorted(METHODS))
def test_check_level_count(name):
    module = build(name)
    with pytest.raises(ValueError, match="3 FPN levels"):
        module(make_inputs(sizes=SIZES[:2], strides=STRIDES[:2]))


@pytest.mark.parametrize("name", sorted(METHODS))
def test_check_spatial_mismatch_names_level(name):
    module = build(name)
    inputs = make_inputs()
    inputs.teacher[1] = torch.randn(2, 6, 4, 5)
    with pytest.raises(ValueError, match=r"level 1 \(stride 16\).*spatial size mismatch"):
        module(inputs)


@pytest.mark.parametrize("name", sorted(METHODS))
def test_check_channel_mismatch_names_level(name):
    module = build(name)
    inputs = make_inputs()
    inputs.student[2] = torch.randn(2, 5, 2, 2)
    with pytest.raises(ValueError, match=r"level 2 .*student has 5 channels.*expects 4"):
        module(inputs)
    inputs = make_inputs()
    inputs.teacher[0] = torch.randn(2, 7, 8, 8)
    with pytest.raises(ValueError, match=r"level 0 .*teacher has 7 channels"):
        module(inputs)


@pytest.mark.parametrize("name", sorted(METHODS))
def test_check_weight_shapes(name):
    module = build(name)
    with pytest.raises(ValueError, match="level 1.*pixel_weights"):
        module(make_inputs(pixel_weights=[torch.ones(2, 8, 8), torch.ones(2, 4, 3), torch.ones(2, 2, 2)]))
    with pytest.raises(ValueError, match="image_weights"):
        module(make_inputs(image_weights=torch.ones(3)))
    with pytest.raises(ValueError, match="level_weights"):
        module(make_inputs(level_weights=torch.ones(2)))


@pytest.mark.parametrize("name", sorted(METHODS))
def test_unit_weights_change_nothing(name):
    module = build(name)
    plain = evaluate(module, make_inputs())
    ones = evaluate(module, make_inputs(pixel_weights=[torch.ones(2, h, w) for h, w in SIZES],
                                        image_weights=torch.ones(2), level_weights=torch.ones(3)))
    assert plain.keys() == ones.keys()
    for key in plain:
        torch.testing.assert_close(ones[key], plain[key], msg=key)
        assert torch.isfinite(plain[key]) and plain[key] > 0, key


@pytest.mark.parametrize("name", sorted(METHODS))
def test_constant_weight_scales_every_term(name):
    """A constant AID weight w scales every term by exactly w, whether it comes as pixel/image or level weights."""
    module = build(name)
    plain = evaluate(module, make_inputs())
    w = 0.6
    by_image = evaluate(module, make_inputs(pixel_weights=[torch.full((2, h, w_), w) for h, w_ in SIZES],
                                            image_weights=torch.full((2,), w)))
    by_level = evaluate(module, make_inputs(level_weights=torch.full((3,), w)))
    for key in plain:
        torch.testing.assert_close(by_image[key], w * plain[key], msg=key)
        torch.testing.assert_close(by_level[key], w * plain[key], msg=key)


@pytest.mark.parametrize("name", sorted(METHODS))
def test_gradients_reach_student_not_teacher(name):
    module = build(name).train()
    inputs = make_inputs()
    for s in inputs.student:
        s.requires_grad_(True)
    for t in inputs.teacher:
        t.requires_grad_(True)  # a caller forgetting to detach still gets no gradient into teacher features
    sum(module(inputs).values()).backward()
    assert all(s.grad is not None for s in inputs.student)
    assert all(t.grad is None for t in inputs.teacher)


def test_build_method_errors_and_params():
    with pytest.raises(ValueError, match=r"unknown distillation method 'nope'.*attention"):
        build_method("nope", 4, 6, 3)
    with pytest.raises(ValueError, match=r"unknown parameter\(s\) \['temp'\].*temperature"):
        build_method("attention", 4, 6, 3, temp=0.5)
    module = build_method("attention", 4, 6, 3, temperature=0.1, am_weight=1.0)
    assert module.temperature == 0.1 and module.am_weight == 1.0
    assert set(method_params("fgd")) == {"temperature", "alpha_fgd", "beta_fgd", "gamma_fgd", "lambda_fgd"}
    assert method_params("fitnet") == {"fitnet_weight": 1.0}
    with pytest.raises(ValueError, match="num_levels"):
        build_method("fitnet", 4, 6, 0)
