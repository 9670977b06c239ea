"""The default ("normalized") loss forms: invariant to batch repetition, resolution and FPN width, and equal to the
published form at the paper's reference setting (2 images per device, 256 channels, 1333x800 input)."""
import pytest
import torch
import torch.nn.functional as F

from aidkd.distill import (
    METHODS,
    DistillInputs,
    GlobalContextBlock,
    attention_masks,
    attention_transfer_loss,
    build_method,
    fgd_attention_loss,
    fgd_feature_loss,
    fgd_global_loss,
    fgd_masks,
    fitnet_loss,
    masked_feature_loss,
    nonlocal_loss,
    pkd_loss,
    reference_cells,
)

SIZES = [(8, 8), (4, 4), (2, 2)]
STRIDES = [8, 16, 32]
BOX = [[0.0, 0.0, 32.0, 32.0]]  # on cell borders at every stride: its footprint scales exactly with the input


def _features(b, c, sizes=SIZES, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(b, c, h, w, generator=g) for h, w in sizes]


def _terms(name, student, teacher, boxes):
    torch.manual_seed(0)
    module = build_method(name, student[0].shape[1], teacher[0].shape[1], len(student)).eval()
    inputs = DistillInputs(student, teacher, STRIDES[:len(student)], boxes)
    return module(inputs)


@pytest.mark.parametrize("name", sorted(METHODS))
@pytest.mark.parametrize("k", [3, 8])
def test_batch_repetition_gives_same_loss_and_gradient(name, k):
    """The same image fed k times: every term and the image's gradient equal those of feeding it once (the
    published sqrt-of-sum terms grew by sqrt(k): 1.73x for 3, 2.83x for 8)."""
    single = [f.requires_grad_(True) for f in _features(1, 4)]
    teacher = _features(1, 6, seed=1)
    boxes = [torch.tensor(BOX)]
    once = _terms(name, single, teacher, boxes)
    repeated_leaf = [f.detach().clone().requires_grad_(True) for f in single]
    many = _terms(name, [f.repeat(k, 1, 1, 1) for f in repeated_leaf], [t.repeat(k, 1, 1, 1) for t in teacher],
                  boxes * k)
    assert once.keys() == many.keys()
    for term in once:
        torch.testing.assert_close(many[term], once[term], rtol=1e-5, atol=0, msg=term)
        g_once = torch.autograd.grad(once[term], single, retain_graph=True, allow_unused=True)
        g_many = torch.autograd.grad(many[term], repeated_leaf, retain_graph=True, allow_unused=True)
        for level, (a, b) in enumerate(zip(g_once, g_many)):
            if a is None:
                assert b is None or b.abs().sum() == 0
                continue
            torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-5 * float(a.abs().max()), msg=f"{term} level {level}")


def _upsample(x, factor=2):
    return F.interpolate(x, scale_factor=factor, mode="nearest")


def _repeat_channels(x, factor=2):
    return x.repeat(1, factor, 1, 1)


def _functional_terms(student, teacher, boxes, stride):
    """Every functional core on one level (student already at the teacher's width)."""
    sp, ch = attention_masks(teacher, 0.5)
    s_sp, s_ch = attention_masks(student, 0.5)
    fg, bg = fgd_masks(boxes, teacher.shape[2], teacher.shape[3], stride)
    out = {
        "am": masked_feature_loss(student, teacher, sp, ch, stride=stride),
        "at_paper": attention_transfer_loss(student, teacher, form="paper", stride=stride),
        "at_code": attention_transfer_loss(student, teacher, form="code", stride=stride),
        "nl": nonlocal_loss(student, teacher, stride=stride),
        "fitnet": fitnet_loss(student, teacher),
        "pkd": pkd_loss(student, teacher),
        "fgd_attention": fgd_attention_loss(s_sp, s_ch, sp, ch, stride=stride),
    }
    out["fgd_fg"], out["fgd_bg"] = fgd_feature_loss(student, teacher, fg, bg, sp, ch)
    torch.manual_seed(5)  # the same context block on both sides of a comparison
    block = GlobalContextBlock(teacher.shape[1])
    torch.nn.init.normal_(block.transform[-1].weight)  # not the identity, so the block's output is tested
    out["fgd_global"] = fgd_global_loss(block(student), block(teacher), stride=stride)
    return out


@pytest.mark.parametrize("stride", [8, 32])
def test_resolution_does_not_change_the_loss(stride):
    """A 2x larger input (the same content at 4x the cells, boxes 2x): every term is unchanged."""
    torch.manual_seed(0)
    student, teacher = torch.randn(2, 6, 4, 6), torch.randn(2, 6, 4, 6)
    box = torch.tensor([[0.0, 0.0, 2.0 * stride, 2.0 * stride]])
    low = _functional_terms(student, teacher, [box, box], stride)
    high = _functional_terms(_upsample(student), _upsample(teacher), [2 * box, 2 * box], stride)
    for term in low:
        torch.testing.assert_close(high[term], low[term], rtol=1e-5, atol=1e-7, msg=term)


def test_width_does_not_change_the_loss():
    """Every channel twice (2x the FPN width): every term is unchanged."""
    torch.manual_seed(0)
    student, teacher = torch.randn(2, 6, 4, 6), torch.randn(2, 6, 4, 6)
    box = torch.tensor([[0.0, 0.0, 16.0, 16.0]])
    narrow = _functional_terms(student, teacher, [box, box], 8)
    wide = _functional_terms(_repeat_channels(student), _repeat_channels(teacher), [box, box], 8)
    for term in narrow:
        if term == "fgd_global":
            continue  # its context block's weights depend on the width; the loss form is checked below
        torch.testing.assert_close(wide[term], narrow[term], rtol=1e-5, atol=1e-7, msg=term)
    s, t = torch.randn(2, 6, 4, 6), torch.randn(2, 6, 4, 6)
    torch.testing.assert_close(fgd_global_loss(_repeat_channels(s), _repeat_channels(t)), fgd_global_loss(s, t))


@pytest.mark.parametrize("stride", [32, 64])
def test_normalized_equals_published_at_reference_setting(stride):
    """2 images, 256 channels, the level's size at the 1333x800 input (padded to 1344x800): both forms agree, so
    the paper's weights are the defaults."""
    h, w = -(-800 // stride), -(-1344 // stride)
    assert h * w == reference_cells(stride)
    torch.manual_seed(0)
    student, teacher = torch.randn(2, 256, h, w), torch.randn(2, 256, h, w)
    sp, ch = attention_masks(teacher, 0.5)
    s_sp, s_ch = attention_masks(student, 0.5)
    fg, bg = fgd_masks([torch.tensor(BOX) * 8] * 2, h, w, stride)
    pw = torch.rand(2, h, w)
    iw = torch.rand(2)
    pairs = {
        "am": lambda r: masked_feature_loss(student, teacher, sp, ch, pw, reduction=r, stride=stride),
        "at": lambda r: attention_transfer_loss(student, teacher, image_weights=iw, reduction=r, stride=stride),
        "nl": lambda r: nonlocal_loss(student, teacher, iw, reduction=r, stride=stride),
        "fgd_fg_bg": lambda r: torch.stack(fgd_feature_loss(student, teacher, fg, bg, sp, ch, pw, reduction=r)),
        "fgd_attention": lambda r: fgd_attention_loss(s_sp, s_ch, sp, ch, iw, reduction=r, stride=stride),
        "fgd_global": lambda r: fgd_global_loss(student, teacher, iw, reduction=r, stride=stride),
    }
    for term, loss in pairs.items():
        torch.testing.assert_close(loss("normalized"), loss("published"), rtol=1e-5, atol=0, msg=term)
    # away from the reference the published form grows with sqrt(batch): the normalized one does not
    four = torch.cat([student, student]), torch.cat([teacher, teacher])
    sp4, ch4 = attention_masks(four[1], 0.5)
    published = masked_feature_loss(*four, sp4, ch4, reduction="published", stride=stride)
    once = masked_feature_loss(student, teacher, sp, ch, reduction="published", stride=stride)
    torch.testing.assert_close(published, 2 ** 0.5 * once, rtol=1e-4, atol=0)
    torch.testing.assert_close(masked_feature_loss(*four, sp4, ch4, stride=stride),
                               masked_feature_loss(student, teacher, sp, ch, stride=stride), rtol=1e-4, atol=0)


@pytest.mark.parametrize("name", ["attention", "nonlocal", "fgd"])
def test_module_reduction_option(name):
    """``reduction: published`` reproduces the authors' form; the two agree at the reference width and batch when
    the level has the reference cell count."""
    h, w = -(-800 // 64), -(-1344 // 64)
    student, teacher = [torch.randn(2, 256, h, w)], [torch.randn(2, 256, h, w)]
    out = {}
    for reduction in ("normalized", "published"):
        torch.manual_seed(0)
        module = build_method(name, 256, 256, 1, reduction=reduction).eval()
        out[reduction] = module(DistillInputs(student, teacher, [64], [torch.tensor(BOX)] * 2))
    for term in out["published"]:
        torch.testing.assert_close(out["normalized"][term], out["published"][term], rtol=1e-5, atol=0, msg=term)
