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
def test_level_weight_scales_every_term(name):
    """A constant level weight w multiplies every term by exactly w."""
    module = build(name)
    plain = evaluate(module, make_inputs())
    w = 0.6
    by_level = evaluate(module, make_inputs(level_weights=torch.full((3,), w)))
    for key in plain:
        torch.testing.assert_close(by_level[key], w * plain[key], msg=key)


def _twin_images():
    """Two identical images (same features, same boxes): every residual of image 0 equals image 1's."""
    inputs = make_inputs()
    for feats in (inputs.student, inputs.teacher):
        for i, f in enumerate(feats):
            feats[i] = f[:1].repeat(2, 1, 1, 1)
    inputs.boxes = [inputs.boxes[0], inputs.boxes[0].clone()]
    for s in inputs.student:
        s.requires_grad_(True)
    return inputs


@pytest.mark.parametrize("name", sorted(METHODS))
def test_aid_weight_enters_linearly_for_pixel_and_global_terms(name):
    """At equal residuals an image of weight w (pixel maps and image weight) gets w times the gradient of an image
    of weight 1, in every term of every method: AID's alpha means the same everywhere (was w**2 for the root terms)."""
    w = 0.37
    module = build(name)
    for term in evaluate(module, make_inputs()):
        inputs = _twin_images()
        inputs.pixel_weights = [torch.stack([torch.full((h, w_), w), torch.ones(h, w_)]) for h, w_ in SIZES]
        inputs.image_weights = torch.tensor([w, 1.0])
        module(inputs)[term].backward()
        for level, s in enumerate(inputs.student):
            g0, g1 = s.grad[0], s.grad[1]
            assert g1.abs().sum() > 0, (term, level)
            torch.testing.assert_close(g0, w * g1, rtol=1e-4, atol=1e-5 * float(g1.abs().max()),
                                       msg=f"{name}/{term} level {level}")


PIXEL_TERMS = {"attention": ["am"], "fitnet": ["fitnet"], "fgd": ["fg", "bg"]}


@pytest.mark.parametrize("name", sorted(PIXEL_TERMS))
def test_aid_pixel_weight_enters_linearly(name):
    """Two cells of one image with equal features and residuals: the one of weight w gets w times the gradient."""
    w = 0.37
    module = build(name)
    for term in PIXEL_TERMS[name]:
        inputs = make_inputs()
        for feats in (inputs.student, inputs.teacher):
            for i, f in enumerate(feats):
                f = f.clone()
                f[:, :, 0, 1] = f[:, :, 0, 0]  # cells (0, 0) and (0, 1): same features, hence same masks
                feats[i] = f.requires_grad_(feats is inputs.student)
        # both cells background (FGD bg: equal bg mask) or both inside one box (FGD fg: equal fg mask)
        box = torch.tensor([[0.0, 0.0, 64.0, 24.0]]) if term == "fg" else torch.zeros(0, 4)
        inputs.boxes = [box, box.clone()]
        maps = [torch.ones(2, h, w_) for h, w_ in SIZES]
        for m in maps:
            m[:, 0, 0] = w
        inputs.pixel_weights = maps
        module(inputs)[term].backward()
        for level, s in enumerate(inputs.student):
            g = s.grad[:, :, 0]
            assert g[:, :, 1].abs().sum() > 0, (term, level)
            torch.testing.assert_close(g[:, :, 0], w * g[:, :, 1], rtol=1e-4, atol=1e-5 * float(g.abs().max()),
                                       msg=f"{name}/{term} level {level}")


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
    assert set(method_params("fgd")) == {"temperature", "alpha_fgd", "beta_fgd", "gamma_fgd", "lambda_fgd",
                                         "reduction"}
    with pytest.raises(ValueError, match="reduction"):
        build_method("attention", 4, 6, 3, reduction="sum")
    assert method_params("fitnet") == {"fitnet_weight": 1.0}
    with pytest.raises(ValueError, match="num_levels"):
        build_method("fitnet", 4, 6, 0)
