"""The paired test against independent computations, and the Table 4 report end to end."""

import itertools
import json
import math
import os
import statistics
import subprocess
import sys
import tempfile

import numpy as np
import pytest
from scipy import stats as sp_stats

from experiments import common, compare, designs, report, tables
from iavae_jax import image_runs, stats

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def brute_force_signed_rank_p(d):
  """One-sided (greater) signed-rank p by enumerating every sign flip; zeros dropped, midranks."""
  d = np.asarray([x for x in d if x != 0.0])
  ranks = sp_stats.rankdata(np.abs(d))
  observed = ranks[d > 0].sum()
  totals = [sum(r for r, s in zip(ranks, signs) if s)
            for signs in itertools.product([False, True], repeat=d.size)]
  return sum(t >= observed - 1e-9 for t in totals) / len(totals)


# ---------------------------------------------------------------------------------------------
# iavae_jax.stats.paired_one_sided


def test_t_test_matches_hand_computation():
  b = np.array([-79.40, -79.45, -79.41, -79.44, -79.38, -79.47, -79.43, -79.40])
  a = b + 0.75 + 0.03 * np.array([-1.5, 0.5, -0.9, 0.15, 1.5, -0.5, 0.9, -0.15])
  result = stats.paired_one_sided(a, b)
  d = a - b
  assert result.shapiro_p == pytest.approx(sp_stats.shapiro(d).pvalue)
  assert result.shapiro_p >= 0.05
  assert result.test == "t-test"
  t = d.mean() / (d.std(ddof=1) / math.sqrt(d.size))
  assert result.p_value == pytest.approx(sp_stats.t.sf(t, d.size - 1), rel=1e-10)
  assert result.n == 8
  assert result.mean_difference == pytest.approx(d.mean())


def test_t_test_direction_is_one_sided():
  rng = np.random.default_rng(0)
  a, b = rng.normal(size=10), rng.normal(size=10)
  forward, backward = stats.paired_one_sided(a, b), stats.paired_one_sided(b, a)
  assert forward.test == backward.test == "t-test"
  assert forward.p_value + backward.p_value == pytest.approx(1.0)


def test_wilcoxon_when_normality_is_rejected_matches_enumeration():
  d = np.array([0.1, 0.2, -0.15, 0.3, 0.25, 0.35, 0.05, 9.0])  # one large outlier
  b = np.linspace(-80.0, -79.0, d.size)
  result = stats.paired_one_sided(b + d, b)
  assert result.shapiro_p == pytest.approx(sp_stats.shapiro(d).pvalue, rel=1e-6)
  assert result.shapiro_p < 0.05
  assert result.test == "wilcoxon"
  assert result.p_value == pytest.approx(brute_force_signed_rank_p(d), rel=1e-6)
  assert result.p_value == pytest.approx(5 / 256)  # negative rank 3: 5 subsets of ranks sum to <= 3


def test_wilcoxon_with_ties_and_zeros_matches_enumeration():
  d = np.array([1.0, 1.0, 1.0, 2.0, 0.0, -1.0, 30.0])
  result = stats.paired_one_sided(d, np.zeros_like(d))
  assert result.test == "wilcoxon"
  assert result.p_value == pytest.approx(brute_force_signed_rank_p(d), rel=1e-6)


def test_alpha_decides_the_test():
  rng = np.random.default_rng(1)
  d = rng.normal(size=12) + 0.5
  shapiro_p = sp_stats.shapiro(d).pvalue
  assert stats.paired_one_sided(d, np.zeros(12), alpha=shapiro_p * 0.99).test == "t-test"
  assert stats.paired_one_sided(d, np.zeros(12), alpha=shapiro_p * 1.01).test == "wilcoxon"


@pytest.mark.parametrize("d, expected", [([1.0, 2.0], 0.25), ([-1.0, 2.0], 0.5),
                                         ([2.0, -1.0], 0.5)])
def test_two_seeds_use_wilcoxon_without_shapiro(d, expected):
  result = stats.paired_one_sided(d, [0.0, 0.0])
  assert (result.test, result.shapiro_p, result.n) == ("wilcoxon", None, 2)
  assert result.p_value == pytest.approx(expected)
  assert result.p_value == pytest.approx(brute_force_signed_rank_p(d))


@pytest.mark.parametrize("c, expected", [(0.0, 1.0), (0.3, 1 / 16), (-0.3, 1.0)])
def test_identical_differences(c, expected):
  b = np.array([-80.0, -79.5, -79.0, -78.0])
  result = stats.paired_one_sided(b + c, b) if c else stats.paired_one_sided(b, b)
  assert (result.test, result.shapiro_p) == ("wilcoxon", None)
  assert result.p_value == pytest.approx(expected)
  if c:
    assert result.p_value == pytest.approx(brute_force_signed_rank_p(np.full(4, c)))


@pytest.mark.parametrize("a, b, message", [
    ([1.0, 2.0, 3.0], [1.0, 2.0], "3 and 2 values"),
    ([1.0], [0.0], "at least 2 seeds"),
    ([], [], "at least 2 seeds"),
    ([1.0, float("nan"), 2.0], [0.0, 0.0, 0.0], "non-finite"),
    ([1.0, 2.0, 3.0], [0.0, float("inf"), 0.0], "non-finite"),
    ([[1.0, 2.0]], [[0.0, 0.0]], "1-D"),
])
def test_bad_input_raises(a, b, message):
  with pytest.raises(ValueError, match=message):
    stats.paired_one_sided(a, b)


def test_summarize_seeds_mean_sample_std_and_undefined_values():
  r = stats.summarize_seeds([-3.0, -1.0, -2.0])
  assert r == {"mean": -2.0, "std": pytest.approx(1.0), "per_seed": [-3.0, -1.0, -2.0]}
  assert r["std"] == pytest.approx(statistics.stdev([-3.0, -1.0, -2.0]))   # ddof = 1
  # One seed: the std is undefined (None), not 0; a missing or non-finite seed makes the
  # mean and std undefined and is None in per_seed.
  assert stats.summarize_seeds([4.0]) == {"mean": 4.0, "std": None, "per_seed": [4.0]}
  assert stats.summarize_seeds([1.0, None]) == {"mean": None, "std": None,
                                                "per_seed": [1.0, None]}
  assert stats.summarize_seeds([1.0, math.inf])["per_seed"] == [1.0, None]
  with pytest.raises(ValueError, match="at least one per-seed value"):
    stats.summarize_seeds([])


def test_paired_comparison_is_the_paired_test_as_a_dictionary():
  a, b = [1.0, 2.5, 2.0, 4.0], [0.5, 1.0, 1.8, 2.0]
  result = stats.paired_one_sided(a, b)
  assert stats.paired_comparison(a, b) == {
      "test": result.test, "p_value": result.p_value, "shapiro_p": result.shapiro_p,
      "mean_difference": result.mean_difference, "n": 4}
  # One seed: no test, the difference alone.
  assert stats.paired_comparison([1.0], [0.25]) == {"test": None, "p_value": None,
                                                    "shapiro_p": None, "mean_difference": 0.75,
                                                    "n": 1}
  with pytest.raises(ValueError, match="one value per seed in both samples, got 2 and 1"):
    stats.paired_comparison([1.0, 2.0], [1.0])


def test_bad_alpha_raises():
  with pytest.raises(ValueError, match="alpha"):
    stats.paired_one_sided([1.0, 2.0, 3.0], [0.0, 0.0, 0.0], alpha=0.0)


# ---------------------------------------------------------------------------------------------
# experiments.report


def fake_results(dataset, seeds, offset, rng, **extra):
  n = len(seeds)
  vae = offset + rng.normal(0.0, 0.05, n)
  models = {"vae": vae, "iavae": vae + 0.7 + rng.normal(0.0, 0.02, n),
            "control": vae + 0.05 + rng.normal(0.0, 0.05, n)}
  out = {"experiment": "images", "dataset": dataset, "tier": "cpu", "seeds": list(seeds),
         "wall_seconds": 812.3, "config": {"ignored": True}, "models": {}}
  for name, elbo in models.items():
    out["models"][name] = {"test_elbo": elbo.tolist(), "test_kl": (20 + elbo * 0).tolist(),
                           "test_iwae": (elbo + 1.0).tolist(), "valid_elbo": elbo.tolist(),
                           "best_epoch": [10] * n}
  out.update(extra)
  return out


def write(path, obj):
  os.makedirs(os.path.dirname(path), exist_ok=True)
  with open(path, "w") as f:
    json.dump(obj, f)


def run_cli(*args, module="experiments.report"):
  return subprocess.run([sys.executable, "-m", module, *args], cwd=ROOT,
                        capture_output=True, text=True, timeout=120)


@pytest.fixture
def workdir():
  with tempfile.TemporaryDirectory() as d:
    rng = np.random.default_rng(0)
    write(os.path.join(d, "mnist", "results.json"), fake_results("mnist", range(5), -79.4, rng))
    write(os.path.join(d, "nested", "omni", "results.json"),
          fake_results("omniglot", [3, 4, 5, 6], -90.3, rng))
    # Another experiment's results.json is not part of Table 4.
    write(os.path.join(d, "synthetic", "results.json"), {"experiment": "synthetic"})
    write(os.path.join(d, "other", "results.json"), {"table2": []})
    yield d


def test_report_end_to_end(workdir):
  result = run_cli(f"--workdir={workdir}")
  assert result.returncode == 0, result.stderr
  with open(os.path.join(workdir, "table4.json")) as f:
    table = json.load(f)
  assert list(table) == ["omniglot", "mnist"]  # the paper's order
  for name, sub in (("mnist", "mnist"), ("omniglot", os.path.join("nested", "omni"))):
    with open(os.path.join(workdir, sub, "results.json")) as f:
      source = json.load(f)
    row = table[name]
    assert row["source"] == os.path.join(sub, "results.json")
    assert row["seeds"] == source["seeds"] and row["tier"] == "cpu"
    assert row["wall_seconds"] == 812.3
    for model in ("vae", "iavae", "control"):
      values = source["models"][model]
      assert row[model]["per_seed"] == values["test_elbo"]
      assert row[model]["mean"] == pytest.approx(statistics.fmean(values["test_elbo"]))
      assert row[model]["std"] == pytest.approx(statistics.stdev(values["test_elbo"]))
      assert row[model]["kl"]["mean"] == pytest.approx(20.0)
      assert row[model]["kl"]["std"] == pytest.approx(0.0)
      assert row[model]["iwae"]["mean"] == pytest.approx(statistics.fmean(values["test_iwae"]))
      assert row[model]["iwae"]["std"] == pytest.approx(statistics.stdev(values["test_iwae"]))
    for key, other in (("iavae_vs_vae", "vae"), ("iavae_vs_control", "control")):
      expected = stats.paired_one_sided(source["models"]["iavae"]["test_elbo"],
                                        source["models"][other]["test_elbo"])
      assert row[key] == {"test": expected.test, "p_value": expected.p_value,
                          "shapiro_p": expected.shapiro_p,
                          "mean_difference": expected.mean_difference, "n": expected.n}
    assert row["iavae_vs_vae"]["p_value"] < 0.05
  with open(os.path.join(workdir, "table4.md")) as f:
    md = f.read()
  assert md == tables.table4(table)
  assert "| Data set | VAE | IA-VAE | control | p (IA-VAE > VAE) |" in md
  m = table["mnist"]
  assert (f"| MNIST | {m['vae']['mean']:.2f} ± {m['vae']['std']:.2f} | "
          f"{m['iavae']['mean']:.2f} ± {m['iavae']['std']:.2f} | ") in md
  assert md.index("| OMNIGLOT |") < md.index("| MNIST |")
  assert "| 5 | 13.5 min |" in md and "| 4 | 13.5 min |" in md
  assert "Shapiro-Wilk" in md and "ddof = 1" in md
  assert "| MNIST | 20.00 ± 0.00 |" in md  # the KL/IWAE table
  assert "## Ablations" not in md   # none trained
  assert "wrote" in result.stdout
  assert not [n for n in os.listdir(workdir) if n.endswith(".tmp")]


def test_a_run_off_the_papers_split_is_marked(workdir):
  # OMNIGLOT from Lake's zips (paper_split false) gets a dagger and the footnote; MNIST from its
  # standard files does not; a results.json without the field (older runs) is not marked.
  rng = np.random.default_rng(1)
  write(os.path.join(workdir, "nested", "omni", "results.json"),
        fake_results("omniglot", range(3), -90.3, rng, data={"paper_split": False}))
  write(os.path.join(workdir, "mnist", "results.json"),
        fake_results("mnist", range(3), -79.4, rng, data={"paper_split": True}))
  write(os.path.join(workdir, "fashion", "results.json"),
        fake_results("fashion_mnist", range(3), -225.9, rng))
  table = report.write_report(workdir)
  assert [table[name]["paper_split"] for name in table] == [False, True, None]
  md = tables.table4(table)
  assert "| OMNIGLOT † |" in md and "| MNIST |" in md and "| Fashion MNIST |" in md
  assert md.count("†") == 3   # both tables and the footnote
  assert "Not the paper's train/test split" in md


def test_table4_markdown_marks_significance_and_single_seed():
  def summary(mean, std):
    return {"mean": mean, "std": std, "per_seed": [],
            "kl": {"mean": 1.0, "std": std, "per_seed": []},
            "iwae": {"mean": None, "std": None, "per_seed": []}}
  table = {
      "cifar": {"source": "c/results.json", "tier": "cpu", "seeds": [0], "wall_seconds": None,
                "vae": summary(-1.0, None), "iavae": summary(-0.5, None),
                "control": summary(-0.9, None),
                "iavae_vs_vae": {"test": None, "p_value": None, "shapiro_p": None,
                                 "mean_difference": 0.5, "n": 1},
                "iavae_vs_control": {"test": None, "p_value": None, "shapiro_p": None,
                                     "mean_difference": 0.4, "n": 1}},
      "fashion_mnist": {"source": "f/results.json", "tier": "gpu", "seeds": [0, 1, 2],
                        "wall_seconds": 7200.0, "vae": summary(-225.871, 0.071),
                        "iavae": summary(-224.79, 0.012), "control": summary(-225.5, 0.05),
                        "iavae_vs_vae": {"test": "t-test", "p_value": 0.00123,
                                         "shapiro_p": 0.5, "mean_difference": 1.0, "n": 3},
                        "iavae_vs_control": {"test": "wilcoxon", "p_value": 0.125,
                                             "shapiro_p": 0.01, "mean_difference": 0.7,
                                             "n": 3}}}
  md = tables.table4(table)
  assert ("| Fashion MNIST | -225.87 ± 0.07 | -224.79 ± 0.01 | -225.50 ± 0.05 | 0.0012* | "
          "t-test (SW p=0.5) | 0.1250 | wilcoxon (SW p=0.01) | 3 | 2.0 h |") in md
  assert ("| cifar | -1.00 | -0.50 | -0.90 | — | none (1 seed) | — | none (1 seed) | 1 | — |"
          in md)
  assert "| cifar | 1.00 | 1.00 | 1.00 | n/a | n/a | n/a |" in md


def test_single_seed_has_no_test(workdir):
  rng = np.random.default_rng(3)
  write(os.path.join(workdir, "mnist", "results.json"), fake_results("mnist", [0], -79.4, rng))
  table = report.write_report(workdir)
  assert table["mnist"]["iavae_vs_vae"]["test"] is None
  assert table["mnist"]["vae"]["std"] is None


def test_diverged_seeds_are_listed(workdir):
  rng = np.random.default_rng(4)
  results = fake_results("mnist", range(4), -79.4, rng)
  results["models"]["iavae"]["valid_elbo"][2] = float("-inf")   # written as -Infinity
  write(os.path.join(workdir, "mnist", "results.json"), results)
  table = report.write_report(workdir)
  assert table["mnist"]["iavae"]["diverged_seeds"] == [2]
  assert table["mnist"]["vae"]["diverged_seeds"] == []
  markdown = open(os.path.join(workdir, "table4.md")).read()
  assert "**Diverged**" in markdown and "MNIST IA-VAE seeds [2]" in markdown


def test_no_results_exits_2():
  with tempfile.TemporaryDirectory() as d:
    write(os.path.join(d, "synthetic", "results.json"), {"experiment": "synthetic"})
    result = run_cli(f"--workdir={d}")
  assert result.returncode == 2
  assert "error: no results.json from experiments.images under" in result.stderr
  assert "python -m experiments.images" in result.stderr


def test_duplicate_dataset_exits_2_naming_both(workdir):
  rng = np.random.default_rng(1)
  write(os.path.join(workdir, "mnist_again", "results.json"),
        fake_results("mnist", range(5), -79.4, rng))
  result = run_cli(f"--workdir={workdir}")
  assert result.returncode == 2
  assert os.path.join(workdir, "mnist", "results.json") in result.stderr
  assert os.path.join(workdir, "mnist_again", "results.json") in result.stderr
  assert not os.path.exists(os.path.join(workdir, "table4.json"))


def test_missing_workdir_exits_2():
  result = run_cli()
  assert result.returncode == 2 and "--workdir is required" in result.stderr


def test_seeds_differing_between_models_is_an_error(workdir):
  path = os.path.join(workdir, "mnist", "results.json")
  with open(path) as f:
    data = json.load(f)
  data["models"]["control"]["test_elbo"] = data["models"]["control"]["test_elbo"][:4]
  write(path, data)
  with pytest.raises(common.ConfigError, match="control.test_elbo has 4 values"):
    report.write_report(workdir)
  data["models"]["control"]["test_elbo"].append(-79.0)
  data["models"]["iavae"]["seeds"] = [0, 1, 2, 3, 9]
  write(path, data)
  with pytest.raises(common.ConfigError, match="'iavae' was run with seeds"):
    report.write_report(workdir)


def test_nan_test_elbo_is_an_error(workdir):
  path = os.path.join(workdir, "mnist", "results.json")
  with open(path) as f:
    data = json.load(f)
  data["models"]["vae"]["test_elbo"][2] = float("nan")
  write(path, data)
  with pytest.raises(common.ConfigError, match="vae.test_elbo is nan for seed 2"):
    report.write_report(workdir)


def test_read_results_checks_the_required_models_and_the_optional_ones_present(tmp_path):
  data = fake_results("mnist", range(3), -100.0, np.random.default_rng(0))
  path = str(tmp_path / "results.json")
  write(path, data)
  assert image_runs.read_results(path, ("vae",), ("iavae_mean_context",)) == data  # absent: fine
  with pytest.raises(common.ConfigError, match="no results for model 'corrector'"):
    image_runs.read_results(path, ("vae", "corrector"))
  data["models"]["iavae_mean_context"] = {**data["models"]["iavae"], "test_kl": [1.0]}
  write(path, data)
  with pytest.raises(common.ConfigError, match="iavae_mean_context.test_kl has 1 values"):
    image_runs.read_results(path, ("vae",), ("iavae_mean_context",))
  assert image_runs.read_results(path, ("vae",))["seeds"] == [0, 1, 2]   # not asked: not read
  assert image_runs.find_results(str(tmp_path)) == [path]
  write(path, {**data, "experiment": "synthetic"})
  assert image_runs.find_results(str(tmp_path)) == []


def test_ablations_are_summarised_and_compared_where_present(tmp_path):
  rng = np.random.default_rng(1)
  seeds = range(5)
  data = fake_results("mnist", seeds, -100.0, rng)
  iavae = np.array(data["models"]["iavae"]["test_elbo"])
  shifts = {"iavae_mean_context": -0.5, "iavae_frozen_decoder": -0.2,
            "control_frozen_decoder": -0.6}   # no vae_matched: that comparison is left out
  for name, shift in shifts.items():
    elbo = (iavae + shift + rng.normal(0.0, 0.02, 5)).tolist()
    data["models"][name] = {"test_elbo": elbo, "test_kl": elbo, "test_iwae": elbo,
                            "valid_elbo": elbo, "best_epoch": [3] * 5}
  # As experiments.images writes it: evaluated, not trained, so no validation ELBO of its own.
  data["models"]["iavae_mean_context"]["valid_elbo"] = [None] * 5
  write(str(tmp_path / "mnist" / "results.json"), data)
  row = report.write_report(str(tmp_path))["mnist"]
  for name in shifts:
    assert row[name]["per_seed"] == data["models"][name]["test_elbo"]
  for key, model, other in (("iavae_vs_iavae_mean_context", "iavae", "iavae_mean_context"),
                            ("iavae_frozen_decoder_vs_control_frozen_decoder",
                             "iavae_frozen_decoder", "control_frozen_decoder")):
    expected = stats.paired_one_sided(data["models"][model]["test_elbo"],
                                      data["models"][other]["test_elbo"])
    assert row[key]["p_value"] == expected.p_value < 0.05
    assert row[key]["mean_difference"] == pytest.approx(expected.mean_difference)
  assert "iavae_vs_vae_matched" not in row and "vae_matched" not in row
  md = (tmp_path / "table4.md").read_text()
  assert "## Ablations" in md and "| MNIST | IA-VAE | " in md
  assert "| IA-VAE, mean input |" in md and "VAE, matched encoder" not in md
  assert row["iavae_mean_context"]["diverged_seeds"] == [] and "Diverged" not in md
  # A malformed ablation entry is refused.
  data["models"]["vae_matched"] = {"test_elbo": [1.0]}
  write(str(tmp_path / "mnist" / "results.json"), data)
  with pytest.raises(common.ConfigError, match="models.vae_matched.test_elbo has 1 values"):
    report.write_report(str(tmp_path))


# ---------------------------------------------------------------------------------------------
# experiments.designs


def design_run(tmp_path, dataset, hypernet, seeds, shift, rng, **config):
  """A results.json of design ``hypernet`` whose VAE and control are those of fake_results with
  the same rng seed, and whose IA-VAE is shifted by ``shift``."""
  data = fake_results(dataset, seeds, -100.0, np.random.default_rng(0))
  data["config"] = {"hypernet": hypernet, **config}
  iavae = np.array(data["models"]["iavae"]["test_elbo"]) + shift + rng.normal(0, 0.02, len(seeds))
  mean_context = np.array(data["models"]["iavae"]["test_elbo"]) + rng.normal(0, 0.02, len(seeds))
  for name, elbo in (("iavae", iavae), ("iavae_mean_context", mean_context)):
    data["models"][name] = {"test_elbo": elbo.tolist(), "test_kl": elbo.tolist(),
                            "test_iwae": elbo.tolist(), "best_epoch": [3] * len(seeds),
                            "valid_elbo": (elbo - 2.0).tolist()
                            if name == "iavae" else [None] * len(seeds)}
  run = tmp_path / f"{hypernet}_{dataset}"
  write(str(run / "results.json"), data)
  return data, run


def test_designs_are_compared_on_the_seeds_they_share(tmp_path):
  rng = np.random.default_rng(2)
  paper, _ = design_run(tmp_path, "mnist", "paper", range(5), 0.0, rng)
  mlp, run = design_run(tmp_path, "mnist", "mlp", range(3), 0.5, rng,
                        hypernet_input="penultimate")
  write(str(run / "gaps.json"), {"seeds": [0, 1, 2], "iavae": {
      "share_of_vae_amortization_gap_closed": {"per_seed": [0.1, 0.2, 0.3]}}})
  table = designs.write_designs(str(tmp_path))
  row = table["mnist"]
  assert row["seeds"] == [0, 1, 2] and row["same_vae"]
  assert list(row["designs"]) == ["paper", "mlp input=penultimate"]   # paper first
  got = row["designs"]["mlp input=penultimate"]
  assert got["iavae"]["per_seed"] == mlp["models"]["iavae"]["test_elbo"]
  expected = stats.paired_one_sided(mlp["models"]["iavae"]["test_elbo"],
                                    paper["models"]["iavae"]["test_elbo"][:3])
  assert got["vs_paper"]["p_value"] == expected.p_value < 0.05
  assert got["vs_paper"]["mean_difference"] == pytest.approx(expected.mean_difference)
  assert got["vs_mean_input"]["mean_difference"] > 0.4
  assert got["gap_closed"]["mean"] == pytest.approx(0.2)
  assert row["designs"]["paper"]["gap_closed"] is None and "vs_paper" not in row["designs"]["paper"]
  assert row["best_on_validation"] == "mlp input=penultimate"
  md = (tmp_path / "designs.md").read_text()
  assert "| MNIST | mlp input=penultimate | " in md and "20.0 ± 10.0%" in md
  assert "the same VAE in every run; best on validation: mlp input=penultimate" in md


def test_designs_flag_different_vaes_and_refuse_what_cannot_be_compared(tmp_path):
  rng = np.random.default_rng(3)
  design_run(tmp_path, "mnist", "paper", range(3), 0.0, rng)
  data, run = design_run(tmp_path, "mnist", "ha", range(3), 0.1, rng)
  data["models"]["vae"]["test_elbo"][1] += 0.01
  write(str(run / "results.json"), data)
  assert not designs.write_designs(str(tmp_path))["mnist"]["same_vae"]
  assert "**the runs' VAEs differ**" in (tmp_path / "designs.md").read_text()
  design_run(tmp_path / "again", "mnist", "ha", range(3), 0.1, rng)
  with pytest.raises(common.ConfigError, match="two runs of design 'ha' on mnist"):
    designs.write_designs(str(tmp_path))
  design_run(tmp_path / "apart", "fashion_mnist", "paper", range(2), 0.0, rng)
  design_run(tmp_path / "apart", "fashion_mnist", "mlp", range(2, 4), 0.0, rng)
  with pytest.raises(common.ConfigError, match="share no seed"):
    designs.write_designs(str(tmp_path / "apart"))
  with pytest.raises(common.ConfigError, match="is not a directory"):
    designs.write_designs(str(tmp_path / "missing"))


def test_designs_command_line(tmp_path):
  rng = np.random.default_rng(4)
  design_run(tmp_path, "mnist", "paper", range(3), 0.0, rng)
  design_run(tmp_path, "mnist", "mlp", range(3), 0.5, rng)
  result = run_cli(f"--workdir={tmp_path}", module="experiments.designs")
  assert result.returncode == 0, result.stderr
  assert "| MNIST | mlp | " in result.stdout and "designs.json and" in result.stdout
  assert json.loads((tmp_path / "designs.json").read_text())["mnist"]["best_on_validation"] == "mlp"
  result = run_cli(f"--workdir={tmp_path / 'missing'}", module="experiments.designs")
  assert result.returncode == 2 and "is not a directory" in result.stderr


# ---------------------------------------------------------------------------------------------
# experiments.compare


def test_compare_pairs_a_model_with_other_runs_models_on_their_shared_seeds(tmp_path):
  rng = np.random.default_rng(5)
  ours, run = design_run(tmp_path, "mnist", "mlp", range(5), 0.5, rng)
  theirs, other = design_run(tmp_path, "mnist", "paper", range(4), 0.0, rng)
  write(str(run / "gaps.json"), {"seeds": [0, 1, 2, 3, 4], "iavae": {
      "share_of_vae_amortization_gap_closed": {"per_seed": [0.1, 0.2, 0.3, 0.4, 0.5]}}})
  summary = lambda value: {"per_seed": [value] * 4}   # the tuned refinement reaches the
  write(str(other / "gaps.json"), {                   # control's -97 at 3 of its 10 steps
      "seeds": [0, 1, 2, 3], "refinement_steps_worth": {"control": {}},
      "vae_refinement": {"tuned": {"steps": [0, 10], "elbo": [summary(-100), summary(-90)]}},
      "control": {"refinement": {"elbo": [summary(-97)]}}})
  table = compare.compare(f"{run}:iavae", [f"{other}:iavae,control"])
  assert table["dataset"] == "mnist" and table["seeds"] == [0, 1, 2, 3]
  assert [(row["workdir"], row["model"]) for row in table["rows"]] == [
      (str(run), "iavae"), (str(other), "iavae"), (str(other), "control")]
  subject, versus_iavae, versus_control = table["rows"]
  assert subject["test_elbo"]["per_seed"] == ours["models"]["iavae"]["test_elbo"][:4]
  assert subject["gap_closed"]["mean"] == pytest.approx(0.25)   # seeds 0-3 of gaps.json
  assert "difference" not in subject and versus_iavae["gap_closed"] is None
  for row, model in ((versus_iavae, "iavae"), (versus_control, "control")):
    expected = stats.paired_one_sided(ours["models"]["iavae"]["test_elbo"][:4],
                                      theirs["models"][model]["test_elbo"])
    assert row["difference"]["p_value"] == expected.p_value < 0.05
    assert row["difference"]["mean_difference"] == pytest.approx(expected.mean_difference)
    assert row["ahead_in_seeds"] == 4
  assert versus_iavae["worth_tuned_steps"] is None   # not in its gaps.json
  assert versus_control["worth_tuned_steps"] == pytest.approx(3.0)
  md = tables.comparison(table)
  assert f"| {other} | iavae | " in md and "| 4 of 4 |" in md
  assert "25.0 ± 12.9%" in md and "MNIST, seeds 0, 1, 2, 3; the VAE: " in md


def _in_seed_order(data: dict, seeds: list) -> dict:
  """data with every model's per-seed lists rearranged to ``seeds`` (a subset, in any order)."""
  index = [data["seeds"].index(seed) for seed in seeds]
  models = {name: {key: [values[i] for i in index] if isinstance(values, list) else values
                   for key, values in entry.items()} for name, entry in data["models"].items()}
  return {**data, "seeds": list(seeds), "models": models}


def test_compare_pairs_by_seed_whatever_each_runs_order(tmp_path):
  rng = np.random.default_rng(8)
  ours, run = design_run(tmp_path, "mnist", "mlp", range(4), 0.5, rng)
  theirs, other = design_run(tmp_path, "mnist", "paper", range(4), 0.0, rng)
  write(str(run / "results.json"), _in_seed_order(ours, [3, 0, 2]))
  write(str(other / "results.json"), _in_seed_order(theirs, [2, 3, 1, 0]))
  table = compare.compare(f"{run}:iavae", [f"{other}/:control"])   # a trailing slash is a path
  assert table["seeds"] == [0, 2, 3]
  on = lambda data, model: [data["models"][model]["test_elbo"][seed] for seed in (0, 2, 3)]
  assert table["rows"][0]["test_elbo"]["per_seed"] == on(ours, "iavae")
  assert table["rows"][1]["test_elbo"]["per_seed"] == on(theirs, "control")
  expected = stats.paired_one_sided(on(ours, "iavae"), on(theirs, "control"))
  assert table["rows"][1]["difference"]["p_value"] == expected.p_value
  one_seed = tmp_path / "one:seed"   # a ':' inside WORKDIR: the model follows the last one
  write(str(one_seed / "results.json"), _in_seed_order(theirs, [2]))
  table = compare.compare(f"{run}:iavae", [f"{one_seed}:iavae"])
  assert table["seeds"] == [2] and table["rows"][1]["difference"]["p_value"] is None
  assert "| 1 of 1 | — |" in tables.comparison(table)


def test_compare_refuses_what_it_cannot_pair(tmp_path):
  rng = np.random.default_rng(6)
  _, run = design_run(tmp_path, "mnist", "mlp", range(3), 0.5, rng)
  data, other = design_run(tmp_path, "mnist", "paper", range(3), 0.0, rng)
  _, elsewhere = design_run(tmp_path, "omniglot", "paper", range(3), 0.0, rng)
  _, later = design_run(tmp_path / "later", "mnist", "paper", range(3, 5), 0.0, rng)
  for model, against, message in [
      (f"{run}", [f"{other}:iavae"], r"--model='.*mlp_mnist' is not WORKDIR:MODEL; e.g."),
      (f"{run}:iavae,control", [f"{other}:iavae"], r"is not WORKDIR:MODEL; e.g. --model=runs/"),
      (f"{run}:iavae", [], "--against is required"),
      (f"{run}:iavae", [f"{other}:iavae,"], r"is not WORKDIR:MODEL\[,MODEL...\]"),
      (f"{tmp_path}:mlp_mnist/results.json", [f"{other}:iavae"], "is not WORKDIR:MODEL"),
      (f"{run}:iavae", [f"{other}:iavae", f"{run}/:iavae"], "iavae of .*mlp_mnist/ is named "
                                                            "twice"),
      (f"{run}:corrector", [f"{other}:iavae"], "has no model 'corrector'; it has vae, iavae, "
                                               "control, iavae_mean_context"),
      (f"{tmp_path}/missing:iavae", [f"{other}:iavae"], "there is no .*missing/results.json"),
      (f"{run}:iavae", [f"{elsewhere}:iavae"], r"different data sets \(mnist, omniglot\)"),
      (f"{run}:iavae", [f"{later}:iavae"], "the runs share no seed")]:
    with pytest.raises(common.ConfigError, match=message):
      compare.compare(model, against)
  data["models"]["vae"]["test_elbo"][2] += 0.01
  write(str(other / "results.json"), data)
  with pytest.raises(common.ConfigError, match=r"the VAEs differ: .*paper_mnist's VAE has test "
                                               r"ELBO \[.*\] on seeds \[0, 1, 2\]"):
    compare.compare(f"{run}:iavae", [f"{other}:iavae"])


def test_compare_command_line(tmp_path):
  rng = np.random.default_rng(7)
  _, run = design_run(tmp_path, "mnist", "mlp", range(3), 0.5, rng)
  _, other = design_run(tmp_path, "mnist", "paper", range(3), 0.0, rng)
  listing = lambda: sorted((root, sorted(files)) for root, _, files in os.walk(tmp_path))
  before = listing()
  result = run_cli(f"--model={run}:iavae", f"--against={other}:iavae",
                   f"--against={run}:iavae_mean_context", module="experiments.compare")
  assert result.returncode == 0, result.stderr
  assert f"| {other} | iavae | " in result.stdout and "| 3 of 3 |" in result.stdout
  result = run_cli(f"--model={run}:iavae", f"--against={other}:control", "--json",
                   module="experiments.compare")
  assert result.returncode == 0, result.stderr
  assert json.loads(result.stdout)["rows"][1]["model"] == "control"
  result = run_cli(f"--against={other}:control", module="experiments.compare")
  assert result.returncode == 2 and "--model is required" in result.stderr
  assert listing() == before   # nothing written


def test_a_malformed_gaps_json_is_refused_by_name_with_exit_code_2(tmp_path):
  rng = np.random.default_rng(9)
  _, run = design_run(tmp_path, "mnist", "mlp", range(2), 0.5, rng)
  _, other = design_run(tmp_path, "mnist", "paper", range(2), 0.0, rng)
  summary = lambda value: {"per_seed": [value] * 2}
  good = {"seeds": [0, 1], "refinement_steps_worth": {"iavae": {}},
          "vae_refinement": {"tuned": {"steps": [0, 10], "elbo": [summary(-100), summary(-90)]}},
          "iavae": {"refinement": {"elbo": [summary(-97)]},
                    "share_of_vae_amortization_gap_closed": summary(0.3)}}
  write(str(run / "gaps.json"), good)
  assert image_runs.read_gaps(str(run)) == good
  broken = lambda **changes: {**good, **changes}
  for gaps, message in [
      ([1, 2], "lists no distinct seeds"),
      (broken(seeds=[0, 0]), "lists no distinct seeds"),
      (broken(iavae={**good["iavae"], "share_of_vae_amortization_gap_closed": summary(None)}),
       r"iavae.share_of_vae_amortization_gap_closed is not a summary with a number for each of "
       r"its 2 seeds"),
      (broken(iavae={"share_of_vae_amortization_gap_closed": {"per_seed": [0.3]}}),
       "iavae.share_of_vae_amortization_gap_closed is not a summary"),
      (broken(iavae={}), "has no iavae.refinement.elbo"),
      (broken(iavae={"refinement": {"elbo": []}}), "iavae.refinement.elbo is not a non-empty"),
      (broken(refinement_steps_worth=["iavae"]), "refinement_steps_worth is not a mapping"),
      ({k: v for k, v in good.items() if k != "vae_refinement"}, "has no vae_refinement"),
      (broken(vae_refinement={"tuned": {"steps": [0], "elbo": [summary(-100), summary(-90)]}}),
       "vae_refinement.tuned does not hold lists 'steps' and 'elbo' of the same length"),
      (broken(vae_refinement={"tuned": {"steps": [0, 1], "elbo": [summary(-100), {}]}}),
       r"vae_refinement.tuned.elbo\[1\] is not a summary")]:
    write(str(run / "gaps.json"), gaps)
    with pytest.raises(common.ConfigError, match=message + ".*rerun experiments.gaps"):
      image_runs.read_gaps(str(run))
  for module, flags in [("experiments.compare", [f"--model={run}:iavae",
                                                 f"--against={other}:iavae"]),
                        ("experiments.designs", [f"--workdir={tmp_path}"])]:
    result = run_cli(*flags, module=module)
    assert result.returncode == 2, result.stderr
    assert "vae_refinement.tuned.elbo[1] is not a summary" in result.stderr
    assert "Traceback" not in result.stderr
  assert not (tmp_path / "designs.json").exists()
