"""AID ``global_terms: pixel``: the global terms with a per-location residual (spatial attention transfer, the
non-local output, FGD's spatial attention and global terms) take the instance pixel map per location; the channel
terms keep the image weights; the default (``image_mean``) leaves every loss as it was."""
import pytest
import torch
import torch.nn.functional as F

from aidkd.distill import (
    AIDWeighting,
    DistillInputs,
    attention_transfer_loss,
    build_method,
    fgd_attention_loss,
    fgd_global_loss,
    instance_pixel_weights,
    nonlocal_loss,
)

SIZES, STRIDES = [(8, 8), (4, 4)], [8, 16]
BOXES = [torch.tensor([[0.0, 0.0, 40.0, 24.0], [16.0, 16.0, 64.0, 64.0]]), torch.tensor([[8.0, 0.0, 48.0, 32.0]])]
LOSSES = [torch.tensor([0.5, 4.0]), torch.tensor([2.0])]
MODULES = [("attention", {}), ("attention", {"at_form": "code"}), ("nonlocal", {}), ("fgd", {})]
# Every term of MODULES on `_inputs()` with AID (instance, alpha 0.3, the image mean on global terms), computed by the
# code before `global_terms` existed (same seeds, one thread as in this suite): the default must reproduce them to
# float32 precision (a thread count or vector width other than the suite's may move the last bit of a sum).
REFERENCE = {"attention/am": 0.19824694097042084, "attention/at": 0.839767336845398,
             "attention_code/am": 0.19824694097042084, "attention_code/at": 0.9018471240997314,
             "nonlocal/nl": 0.15567591786384583, "fgd/fg": 0.6916117072105408, "fgd/bg": 0.5261890292167664,
             "fgd/attention": 6.359570503234863, "fgd/global": 21.547096252441406}
PIXEL_WISE = {"am", "fg", "bg"}  # terms that take the pixel maps in either setting


def _inputs(global_terms="image_mean", student=None, teacher=None, boxes=BOXES, losses=LOSSES, sizes=SIZES):
    g = torch.Generator().manual_seed(3)
    student = student if student is not None else [torch.randn(2, 4, h, w, generator=g) for h, w in sizes]
    teacher = teacher if teacher is not None else [torch.randn(2, 6, h, w, generator=g) for h, w in sizes]
    aid = AIDWeighting("instance", alpha=0.3, global_terms=global_terms)
    weights = aid.make(losses, None, boxes, sizes, STRIDES, len(boxes))
    return DistillInputs(student, teacher, STRIDES, boxes, *weights, location_weights=aid.location_weights(weights))


def _terms(inputs):
    out = {}
    for name, params in MODULES:
        torch.manual_seed(0)
        module = build_method(name, inputs.student[0].shape[1], inputs.teacher[0].shape[1], len(inputs.student),
                              **params)
        for term, value in module(inputs).items():
            out[f"{name}{'_code' if params else ''}/{term}"] = value
    return out


def test_default_image_mean_gives_every_loss_as_before_to_every_digit():
    terms = {k: v.item() for k, v in _terms(_inputs()).items()}
    assert terms.keys() == REFERENCE.keys()
    for key, value in REFERENCE.items():
        assert terms[key] == pytest.approx(value, rel=2.5e-7, abs=0), key  # within 2 float32 ulps


def test_pixel_changes_only_the_global_terms():
    default, pixel = _terms(_inputs()), _terms(_inputs("pixel"))
    for key in REFERENCE:
        if key.split("/")[1] in PIXEL_WISE:
            assert pixel[key].item() == default[key].item(), key
        else:
            assert abs(pixel[key].item() - default[key].item()) > 1e-4 * abs(default[key].item()), key


def _twin_locations(c=5, h=4, w=6, seed=0):
    """Student and teacher (1, c, h, w) whose features at A = (0, 0) and B = (2, 3) are equal, so their residuals
    are; location weights w at A, 1 at B, others in (0, 1]."""
    g = torch.Generator().manual_seed(seed)
    s, t = torch.randn(1, c, h, w, generator=g), torch.randn(1, c, h, w, generator=g)
    s[..., 2, 3], t[..., 2, 3] = s[..., 0, 0], t[..., 0, 0]
    weights = torch.rand(1, h, w, generator=g) * 0.9 + 0.1
    weights[0, 0, 0], weights[0, 2, 3] = 0.3, 1.0
    return s.requires_grad_(True), t, weights


def _grad(loss, x):
    return torch.autograd.grad(loss, x)[0]


@pytest.mark.parametrize("form", ["paper", "code"])
def test_spatial_attention_transfer_is_linear_per_location_and_channel_keeps_the_image_weight(form):
    s, t, weights = _twin_locations()
    image_w = torch.tensor([0.7])

    def at(location):
        return attention_transfer_loss(s, t, form=form, image_weights=image_w, location_weights=location)

    # the spatial term alone: the channel term does not depend on the location weights (all zero: no spatial term)
    spatial = _grad(at(weights), s) - _grad(at(torch.zeros_like(weights)), s)
    torch.testing.assert_close(spatial[..., 0, 0], 0.3 * spatial[..., 2, 3], rtol=1e-5, atol=1e-8)
    assert spatial[..., 2, 3].abs().sum() > 0
    # the channel term takes the image weight whatever the location weights are
    base = attention_transfer_loss(s, t, form=form, image_weights=image_w)
    channel_only = attention_transfer_loss(s, t, form=form, image_weights=image_w,
                                           location_weights=torch.zeros_like(weights))
    assert channel_only.item() < base.item()
    torch.testing.assert_close(at(image_w[:, None, None].expand_as(weights)), base)  # a constant map = the image's


def test_nonlocal_output_residual_is_linear_per_location():
    s, t, weights = _twin_locations()
    g = _grad(nonlocal_loss(s, t, location_weights=weights), s)
    torch.testing.assert_close(g[..., 0, 0], 0.3 * g[..., 2, 3], rtol=1e-5, atol=1e-8)
    assert g[..., 2, 3].abs().sum() > 0
    image_w = torch.tensor([0.6])
    torch.testing.assert_close(nonlocal_loss(s, t, location_weights=image_w[:, None, None].expand_as(weights)),
                               nonlocal_loss(s, t, image_w))


def test_fgd_spatial_attention_and_global_terms_are_linear_per_location():
    s, t, weights = _twin_locations()
    s_sp, t_sp = s[:, 0].detach().requires_grad_(True), t[:, 0]  # spatial attention maps (1, h, w)
    s_ch, t_ch = s[:, :, 0, 0].detach().requires_grad_(True), t[:, :, 0, 0]  # channel attention (1, c)
    image_w = torch.tensor([0.6])
    attention = fgd_attention_loss(s_sp, s_ch, t_sp, t_ch, image_w, location_weights=weights)
    g_sp, g_ch = torch.autograd.grad(attention, [s_sp, s_ch])
    torch.testing.assert_close(g_sp[0, 0, 0], 0.3 * g_sp[0, 2, 3])
    assert g_sp[0, 2, 3] != 0
    _, g_ch_image = torch.autograd.grad(fgd_attention_loss(s_sp, s_ch, t_sp, t_ch, image_w), [s_sp, s_ch])
    torch.testing.assert_close(g_ch, g_ch_image)  # the channel term keeps the image weight
    g = _grad(fgd_global_loss(s, t, location_weights=weights), s)
    torch.testing.assert_close(g[..., 0, 0], 0.3 * g[..., 2, 3])
    constant = image_w[:, None, None].expand_as(weights)
    torch.testing.assert_close(fgd_global_loss(s, t, location_weights=constant), fgd_global_loss(s, t, image_w))
    torch.testing.assert_close(fgd_attention_loss(s_sp, s_ch, t_sp, t_ch, image_w, location_weights=constant),
                               fgd_attention_loss(s_sp, s_ch, t_sp, t_ch, image_w))


def test_an_instance_of_weight_w_gets_w_times_the_gradient_at_its_pixels():
    """Two boxes on equal content, teacher losses l1 and l2: at their cells the spatial attention-transfer, non-local
    and FGD global residuals get exp(-alpha (l1 - l2)) times the gradient (through the AID maps of `make`)."""
    s, t, _ = _twin_locations(h=4, w=6)
    stride = 8
    boxes = [torch.tensor([[0.0, 0.0, 8.0, 8.0], [24.0, 16.0, 32.0, 24.0]])]  # cells (0, 0) and (2, 3)
    aid = AIDWeighting("instance", alpha=0.5, global_terms="pixel")
    weights = aid.make([torch.tensor([2.0, 0.4])], None, boxes, [(4, 6)], [stride], 1)
    location = aid.location_weights(weights)[0]
    ratio = torch.exp(torch.tensor(-0.5 * (2.0 - 0.4)))
    for term in (lambda m: attention_transfer_loss(s, t, location_weights=m, stride=stride),
                 lambda m: nonlocal_loss(s, t, location_weights=m, stride=stride),
                 lambda m: fgd_global_loss(s, t, location_weights=m, stride=stride)):
        g = _grad(term(location), s) - _grad(term(torch.zeros_like(location)), s)
        torch.testing.assert_close(g[..., 0, 0], ratio * g[..., 2, 3], rtol=1e-5, atol=1e-8)


@pytest.mark.parametrize("k", [3])
def test_batch_repetition_leaves_the_pixel_terms_unchanged(k):
    g = torch.Generator().manual_seed(1)
    student = [torch.randn(1, 4, h, w, generator=g).requires_grad_(True) for h, w in SIZES]
    teacher = [torch.randn(1, 6, h, w, generator=g) for h, w in SIZES]
    once = _terms(_inputs("pixel", student, teacher, BOXES[:1], LOSSES[:1]))
    leaf = [f.detach().clone().requires_grad_(True) for f in student]
    many = _terms(_inputs("pixel", [f.repeat(k, 1, 1, 1) for f in leaf], [f.repeat(k, 1, 1, 1) for f in teacher],
                          BOXES[:1] * k, LOSSES[:1] * k))
    for key in once:
        torch.testing.assert_close(many[key], once[key], rtol=1e-5, atol=0, msg=key)
        for a, b in zip(torch.autograd.grad(once[key], student, retain_graph=True, allow_unused=True),
                        torch.autograd.grad(many[key], leaf, retain_graph=True, allow_unused=True)):
            if a is not None:
                torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-5 * float(a.abs().max()), msg=key)


@pytest.mark.parametrize("stride", [8, 32])
def test_resolution_leaves_the_pixel_terms_unchanged(stride):
    """2x the input (4x the cells, boxes 2x, on cell borders): the instance maps scale with it and every
    per-location global term is unchanged."""
    torch.manual_seed(0)
    s, t = torch.randn(2, 6, 4, 6), torch.randn(2, 6, 4, 6)
    boxes = [torch.tensor([[0.0, 0.0, 2.0 * stride, 2.0 * stride]]), torch.tensor([[stride, stride, 3.0 * stride,
                                                                                    4.0 * stride]])]
    w = [torch.tensor([0.4]), torch.tensor([0.7])]

    def terms(s, t, boxes):
        h, wd = s.shape[-2:]
        m = instance_pixel_weights(boxes, w, h, wd, stride)
        s_sp, t_sp, s_ch, t_ch = s.abs().mean(1), t.abs().mean(1), s.abs().mean((2, 3)), t.abs().mean((2, 3))
        return {"at": attention_transfer_loss(s, t, location_weights=m, stride=stride),
                "nl": nonlocal_loss(s, t, location_weights=m, stride=stride),
                "fgd_attention": fgd_attention_loss(s_sp, s_ch, t_sp, t_ch, location_weights=m, stride=stride),
                "fgd_global": fgd_global_loss(s, t, location_weights=m, stride=stride)}

    def up(x):
        return F.interpolate(x, scale_factor=2, mode="nearest")

    low, high = terms(s, t, boxes), terms(up(s), up(t), [2 * b for b in boxes])
    for key in low:
        torch.testing.assert_close(high[key], low[key], rtol=1e-5, atol=1e-7, msg=key)


def test_location_weights_of_the_wrong_shape_are_refused():
    inputs = _inputs("pixel")
    inputs.location_weights = [m[:, :-1] for m in inputs.location_weights]
    with pytest.raises(ValueError, match="location_weights shape"):
        build_method("nonlocal", 4, 6, 2)(inputs)
