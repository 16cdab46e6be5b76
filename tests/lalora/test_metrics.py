import pytest

from lalora import continual_metrics


def test_worked_example():
    # columns: source, d1, d2; rows: before, after stage 1, after stage 2
    R = [[0.9, 0.1, 0.0], [0.5, 0.8, 0.2], [0.3, 0.4, 0.9]]
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


def test_probe_columns_and_a_lower_is_better_source():
    # columns: source scored by NLL (lower is better), d1 (accuracy), probe p (accuracy); one stage
    R = [[2.0, 0.1, 0.6], [2.5, 0.7, 0.5]]
    m = continual_metrics(R, higher_is_better=[False, True, True])
    assert m.averaged == (1, 2)  # averages stay on the accuracy scale
    assert m.ACC == pytest.approx((0.7 + 0.5) / 2)
    assert m.BWT == pytest.approx(0.5 - 0.6)  # the probe's reference is row 0, like the source's
    assert m.FWT is None
    assert m.forgetting_columns == (0, 2)
    assert m.forgetting == pytest.approx([2.5 - 2.0, 0.6 - 0.5])  # NLL rose by 0.5: positive forgetting
    assert m.learning == pytest.approx([0.6])
    assert m.mean_forgetting == pytest.approx(0.1) and m.source_forgetting == pytest.approx(0.1)


def test_every_column_lower_is_better():
    R = [[1.0, 3.0, 3.0], [1.5, 1.0, 2.9], [1.2, 2.0, 0.8]]
    m = continual_metrics(R, higher_is_better=[False, False, False])
    assert m.averaged == (0, 1, 2)
    assert m.ACC == pytest.approx((1.2 + 2.0 + 0.8) / 3)
    assert m.BWT == pytest.approx((-(1.2 - 1.0) - (2.0 - 1.0)) / 2)
    assert m.FWT == pytest.approx(-(2.9 - 3.0))
    assert m.forgetting == pytest.approx([1.2 - 1.0, 2.0 - 1.0])
    assert m.learning == pytest.approx([3.0 - 1.0, 2.9 - 0.8])
    assert m.mean_learning == pytest.approx(2.05) and m.source_forgetting == pytest.approx(0.2)


def test_direction_length_must_match():
    with pytest.raises(ValueError, match="higher_is_better has 2 entries for 3 columns"):
        continual_metrics([[1.0, 0.0, 0.5], [1.0, 1.0, 0.5]], [True, True])


def test_nll_scored_stages_keep_their_learning_next_to_an_accuracy_probe():
    # the study's shape: source = capitals (accuracy), two math stages scored by target NLL
    R = [[0.79, 1.60, 1.50], [0.70, 1.20, 1.35], [0.65, 1.30, 1.00]]
    m = continual_metrics(R, higher_is_better=[True, False, False])
    assert m.averaged == (0,)  # ACC, BWT stay on the accuracy scale
    assert m.learning == pytest.approx([0.40, 0.35])
    assert m.mean_learning == pytest.approx(0.375)  # no accuracy among the stages: their NLL gains
    assert m.forgetting == pytest.approx([0.14, 0.10])
    assert m.mean_forgetting == pytest.approx(0.14) and m.source_forgetting == pytest.approx(0.14)
    mixed = continual_metrics([[0.5, 0.1, 3.0], [0.4, 0.6, 2.0], [0.3, 0.5, 1.0]], higher_is_better=[True, True, False])
    assert mixed.mean_learning == pytest.approx(0.5)  # an accuracy stage present: the NLL stage stays out
