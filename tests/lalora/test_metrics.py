import pytest

from lalora import continual_metrics


def test_worked_example():
    # columns: source, d1, d2; rows: before, after stage 1, after stage 2
    R = [[0.9, 0.1, 0.0],
         [0.5, 0.8, 0.2],
         [0.3, 0.4, 0.9]]
    m = continual_metrics(R)
    assert m.ACC == pytest.approx((0.3 + 0.4 + 0.9) / 3)
    assert m.BWT == pytest.approx(((0.3 - 0.9) + (0.4 - 0.8)) / 2)
    assert m.FWT == pytest.approx(0.2 - 0.0)
    assert m.forgetting == pytest.approx([0.9 - 0.3, 0.8 - 0.4])
    assert m.learning == pytest.approx([0.8 - 0.1, 0.9 - 0.2])
    assert m.mean_forgetting == pytest.approx(0.5)


def test_no_forgetting_is_zero_and_one_stage_has_no_fwt():
    m = continual_metrics([[1.0, 0.0], [1.0, 1.0]])
    assert m.forgetting == [0.0] and m.BWT == 0.0 and m.FWT is None and m.learning == [1.0]


def test_shape_errors():
    with pytest.raises(ValueError, match="must be \\(T\\+1\\) x \\(T\\+1\\)"):
        continual_metrics([[1.0, 2.0]])
    with pytest.raises(ValueError):
        continual_metrics([[1.0, 2.0], [1.0]])
