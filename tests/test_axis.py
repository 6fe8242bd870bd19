"""Verdicts along an axis (bnstudy.analysis.axis): regions, crossovers and the sentence a reader sees."""

from bnstudy.analysis import axis


def test_regions_group_neighbouring_values_with_the_same_verdict_in_axis_order():
    values = [128, 2, 8, 32]
    verdicts = ["inconclusive", "supported", "contradicted", "inconclusive"]
    assert axis.regions(values, verdicts) == [
        ("supported", [2]),
        ("contradicted", [8]),
        ("inconclusive", [32, 128]),
    ]


def test_the_sentence_names_each_region_and_brackets_the_crossover():
    text = axis.sentence(
        "train.batch_size",
        [2, 4, 8, 32, 128],
        ["supported", "supported", "contradicted", "inconclusive", "inconclusive"],
    )
    assert text == (
        "supported at batch <= 4, contradicted at batch 8, inconclusive at batch >= 32 (crossover between 4 and 8)"
    )


def test_a_crossover_is_bracketed_across_undecided_values():
    assert axis.crossovers([1, 2, 3, 4], ["supported", "inconclusive", "inconclusive", "contradicted"]) == [(1, 4)]
    assert axis.crossovers([1, 2, 3], ["supported", "inconclusive", "supported"]) == []


def test_one_verdict_everywhere_is_said_once_and_mixed_verdicts_are_not_one_word():
    assert axis.sentence("optimizer.lr", [0.01, 0.1], ["supported", "supported"]) == (
        "supported at every lr searched (0.01, 0.1)"
    )
    assert axis.overall_along(["supported", "supported"]) == "supported"
    assert axis.overall_along(["supported", "contradicted", "inconclusive"]) == "depends"
    assert axis.overall_along(["supported", "inconclusive"]) == "inconclusive"


def test_along_an_axis_the_study_rule_holds_at_every_value():
    """Contradicted at some values and inconclusive elsewhere is contradicted, as a plain contradicted
    comparison makes the study; negligible where nothing supports it; a failure beside support depends."""
    assert axis.overall_along(["contradicted", "contradicted", "inconclusive"]) == "contradicted"
    assert axis.overall_along(["negligible", "inconclusive"]) == "negligible"
    assert axis.overall_along(["negligible", "contradicted"]) == "contradicted"
    assert axis.overall_along(["supported", "negligible"]) == "depends"
    assert axis.crossovers([2, 8], ["supported", "negligible"]) == [(2, 8)]


def test_an_along_sentence_names_each_context_beyond_the_axis():
    import pandas as pd

    from bnstudy.analysis.verdicts import along_sentence

    g = pd.DataFrame(
        {
            "comparison": "(norm=layer) - (norm=batch)",
            "metric": "test/acc",
            "along_axis": "train.batch_size",
            "along_value": [2, 32, 2, 32],
            "along_context": ["init_scale=0.5", "init_scale=0.5", "init_scale=2", "init_scale=2"],
            "verdict": ["supported", "inconclusive", "inconclusive", "inconclusive"],
        }
    )
    assert along_sentence(g) == (
        "(norm=layer) - (norm=batch) on `test/acc`: at init_scale=0.5: supported at batch 2, inconclusive at "
        "batch 32; at init_scale=2: inconclusive at every batch searched (2, 32)"
    )
