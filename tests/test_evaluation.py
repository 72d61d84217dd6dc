"""Evaluation: text normalisation, WER/CER (hand-computed cases), report files, and ``test.py``
end to end on a tiny checkpoint trained here on real GRID clips."""

from __future__ import annotations

import importlib.util
import json
import shutil
from pathlib import Path

import matplotlib.image
import pytest

from avsr.evaluation.report import (
    HypothesisRow,
    merge_results,
    parse_condition,
    read_hypotheses,
    render_markdown,
    system_labels,
    write_hypotheses,
    write_report,
)
from avsr.evaluation.wer import char_errors, error_summary, normalize_text, word_errors

REPO = Path(__file__).resolve().parents[1]
REFS = ["BIN BLUE AT F TWO NOW", "PLACE RED IN A ZERO PLEASE", "SET WHITE WITH P FOUR SOON"]


# ------------------------------------------------------------------------------ normalisation


@pytest.mark.parametrize("raw, norm", [
    ("Don't  stop-now.", "DONT STOP NOW"),
    ("  bin blue, at f two — now!\t", "BIN BLUE AT F TWO NOW"),
    ("“Quoted” (aside) word", "QUOTED ASIDE WORD"),
    ("", ""),
])
def test_normalisation_uppercases_strips_punctuation_and_collapses_spaces(raw, norm):
    assert normalize_text(raw) == norm


# ------------------------------------------------------------------------------------- WER


def test_perfect_hypotheses_score_zero_and_empty_ones_score_one():
    assert word_errors(REFS, REFS).rate == 0.0 and char_errors(REFS, REFS).rate == 0.0
    empty = word_errors(REFS, ["", "", ""])
    assert empty.rate == 1.0 and empty.deletions == empty.n_ref == 18
    assert char_errors(REFS, ["", "", ""]).rate == 1.0


def test_hand_computed_wer_on_a_few_sentences():
    hyps = [
        "bin blue at f two now.",  # correct once normalised
        "PLACE RED IN ZERO PLEASE NOW",  # deletes A, inserts NOW
        "SET WHITE BY P FIVE",  # WITH -> BY, FOUR -> FIVE, deletes SOON
    ]
    e = word_errors(REFS, hyps)
    assert (e.substitutions, e.deletions, e.insertions, e.n_ref) == (2, 2, 1, 18)
    assert e.rate == pytest.approx(5 / 18)
    summary = error_summary(REFS, hyps)
    assert summary["wer"] == pytest.approx(5 / 18) and summary["n_utterances"] == 3 and summary["n_words"] == 18
    # characters: "A " deleted (2) + " NOW" inserted (4); "WITH"->"BY" (2 sub + 2 del), "FOUR"->"FIVE" (3 sub),
    # " SOON" deleted (5): 18 edits over 21 + 26 + 26 characters
    c = char_errors(REFS, hyps)
    assert c.errors == 18 and c.n_ref == 73
    assert summary["cer"] == pytest.approx(18 / 73)


def test_wer_counts_insertions_beyond_one_and_rejects_mismatched_lists():
    assert word_errors(["A B"], ["A X Y Z B"]).rate == pytest.approx(1.5)
    with pytest.raises(ValueError, match="2 references but 1 hypotheses"):
        word_errors(["A", "B"], ["A"])
    with pytest.raises(ValueError, match="sequences"):
        word_errors("A B", "A B")


# ---------------------------------------------------------------------------------- report


CONDITIONS = ["clean", "occlusion", "babble_snr-5", "babble_snr10", "occlusion+babble_snr-5", "occlusion+babble_snr10"]


def _results(systems=("audio", "audiovisual")):
    res = {"data": {"name": "grid", "split": "test"}, "conditions": CONDITIONS, "systems": {}}
    for k, mode in enumerate(systems):
        conds = {}
        for i, c in enumerate(CONDITIONS):
            wer = 0.1 * (i + 1) / (k + 1)
            conds[c] = {"wer": wer, "cer": wer / 2, "substitutions": 1, "deletions": 0, "insertions": 0,
                        "n_utterances": 3, "n_words": 18, "decode_seconds": 1.5, "rtf": 0.2, "n_skipped": 0}
        res["systems"][mode] = {"checkpoint": f"{mode}.pt", "mode": mode, "decode": {"beam_size": 4},
                                "conditions": conds}
    return res


def test_condition_names_parse_into_visual_condition_and_snr():
    assert parse_condition("clean") == ("clean", None)
    assert parse_condition("occlusion_noise_blur") == ("occlusion_noise_blur", None)
    assert parse_condition("babble_snr-5") == ("clean", -5.0)
    assert parse_condition("occlusion+babble_snr15") == ("occlusion", 15.0)


def test_report_has_a_row_per_condition_and_a_column_per_system(tmp_path):
    rows = {c: [HypothesisRow("u1", "audio", 1, 6, "A B\tC", "A B C"), HypothesisRow("u0", "audio", 0, 6, "X", "X")]
            for c in CONDITIONS}
    report = write_report(tmp_path, _results(), rows)
    text = report.read_text()
    assert "| video | audio: babble SNR (dB) | audio | audiovisual |" in text
    assert "| occlusion | -5 | 50.0 | 25.0 |" in text and "| clean | clean | 10.0 | 5.0 |" in text
    table = text.split("## Word error rate (%)")[1].split("##")[0]
    assert sum(line.startswith("| ") for line in table.splitlines()) == 1 + len(CONDITIONS)
    assert json.loads((tmp_path / "results.json").read_text()) == _results()
    back = read_hypotheses(tmp_path / "hypotheses" / "occlusion.tsv")
    assert [r.utt_id for r in back] == ["u0", "u1"] and back[1].reference == "A B C"
    image = matplotlib.image.imread(tmp_path / "wer_vs_snr.png")
    assert image.ndim == 3 and image.shape[0] > 100 and "wer_vs_snr.png" in text


def _aux_block(stoi=None):
    aux = {"mouth_opening": {"pooled": {"pearson": 0.5, "mae": 0.0123, "r2": 0.2},
                             "utterance_mean": {"pearson": 0.4, "mae": 0.011, "r2": None},
                             "n_utterances": 3, "n_frames": 225, "sources": {}}}
    if stoi is not None:
        aux["lip2speech"] = {"stoi": stoi, "estoi": stoi / 2, "n_utterances": 3, "griffin_lim_iters": 32}
    return aux


def test_report_has_an_aux_table_only_for_systems_with_heads():
    res = _results()
    res["systems"]["audiovisual"]["conditions"]["clean"]["aux"] = _aux_block(stoi=0.6)
    res["systems"]["audiovisual"]["conditions"]["occlusion"]["aux"] = _aux_block()
    text = render_markdown(res)
    table = text.split("## Auxiliary heads")[1].split("##")[0]
    rows = [line for line in table.splitlines() if line.startswith("| ")]
    assert rows[0].startswith("| system | video | audio: babble SNR (dB) | mouth opening: Pearson r (pooled) |")
    assert rows[1:] == ["| audiovisual | clean | clean | 0.500 | 0.400 | 0.0123 | 0.200 | 0.600 | 0.300 |",
                        "| audiovisual | occlusion | clean | 0.500 | 0.400 | 0.0123 | 0.200 | – | – |"]
    assert "Auxiliary heads" not in render_markdown(_results())  # no heads, no table


def test_merging_keeps_systems_of_one_mode_apart():
    a, b = _results(("audio",)), _results(("audio",))
    b["systems"]["audio"]["checkpoint"] = "other.pt"
    merged, renames = merge_results([a, b])
    assert list(merged["systems"]) == ["audio (audio)", "audio (other)"]
    assert renames == [{"audio": "audio (audio)"}, {"audio": "audio (other)"}]
    assert system_labels(["video", "audio"], ["x.pt", "y.pt"]) == ["video", "audio"]
    assert "Decoding: beam_size 4." in render_markdown(merged)


def test_hypothesis_tsv_round_trips_awkward_text(tmp_path):
    rows = [HypothesisRow("s1_bbaf2n", "video", 2, 6, 'SAY "HI"\\ NOW', "")]
    write_hypotheses(tmp_path / "h.tsv", rows)
    assert read_hypotheses(tmp_path / "h.tsv") == rows


# ------------------------------------------------------------------------- test.py end to end


def _load_cli():
    spec = importlib.util.spec_from_file_location("avsr_test_cli", REPO / "test.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def protocol_file(grid_prepared, tmp_path_factory):
    from avsr.corruption import OccluderBank, Utterance, make_protocol, save_protocol
    from avsr.data.manifest import read_manifest

    rows = read_manifest(grid_prepared, "test")
    protocol = make_protocol([Utterance(r.utt_id, r.n_frames, r.n_samples) for r in rows], 0, OccluderBank.builtin(),
                             [r.utt_id for r in rows], babble_speakers=min(2, len(rows) - 1))
    path = tmp_path_factory.mktemp("protocol") / "spec.json"
    save_protocol(protocol, path)
    return path


def test_cli_writes_results_hypotheses_and_report_for_every_condition(grid_prepared, tiny_checkpoint,
                                                                      protocol_file, tmp_path):
    from avsr.corruption import load_protocol
    from avsr.data.manifest import read_manifest

    cli = _load_cli()
    conditions = load_protocol(protocol_file).conditions
    utts = sorted(r.utt_id for r in read_manifest(grid_prepared, "test"))
    out = tmp_path / "greedy"
    rc = cli.main(["--checkpoint", str(tiny_checkpoint), "--data", str(grid_prepared), "--protocol",
                   str(protocol_file), "--out", str(out), "--batch_size", "4", "--gpu", "-1", "--data_name", "grid",
                   "--decode.method=greedy"])
    assert rc == 0
    results = json.loads((out / "results.json").read_text())
    assert results["conditions"] == conditions and list(results["systems"]) == ["audiovisual_relscore"]
    system = results["systems"]["audiovisual_relscore"]
    assert system["decode"]["method"] == "greedy" and results["data"]["name"] == "grid"
    for cond in conditions:
        m = system["conditions"][cond]
        assert m["n_utterances"] == len(utts) and m["n_words"] == 6 * len(utts)  # GRID: 6 words a sentence
        assert m["wer"] == pytest.approx((m["substitutions"] + m["deletions"] + m["insertions"]) / m["n_words"])
        assert m["decode_seconds"] > 0 and m["rtf"] == pytest.approx(m["decode_seconds"] / (3.0 * len(utts)), rel=0.05)
        rows = read_hypotheses(out / "hypotheses" / f"{cond}.tsv")
        assert sorted(r.utt_id for r in rows) == utts
        assert sum(r.errors for r in rows) == m["substitutions"] + m["deletions"] + m["insertions"]
    report = (out / "report.md").read_text()
    for cond in conditions:
        visual, snr = parse_condition(cond)
        assert f"| {visual} | {'clean' if snr is None else f'{snr:g}'} |" in report
    assert (out / "wer_vs_snr.png").stat().st_size > 1000

    # a second system (beam search, another file of the same mode), merged with the first into one report
    other = tmp_path / "copy.pt"
    shutil.copy(tiny_checkpoint, other)
    merged = tmp_path / "merged"
    rc = cli.main(["--checkpoint", str(other), "--data", str(grid_prepared), "--protocol", str(protocol_file),
                   "--conditions", "clean", "babble_snr0", "--out", str(merged), "--gpu", "-1",
                   "--decode.beam_size=2", "--decode.max_len_ratio", "0.2", "--merge", str(out)])
    assert rc == 0
    res = json.loads((merged / "results.json").read_text())
    assert len(res["systems"]) == 2 and res["conditions"][:2] == ["clean", "babble_snr0"]
    beam = res["systems"]["audiovisual_relscore (copy)"]
    assert beam["decode"]["beam_size"] == 2 and beam["decode"]["max_len_ratio"] == 0.2
    assert set(beam["conditions"]) == {"clean", "babble_snr0"}
    assert set(res["conditions"]) == set(conditions)
    assert {r.system for r in read_hypotheses(merged / "hypotheses" / "clean.tsv")} == set(res["systems"])


def test_cli_reports_bad_input_in_one_line(grid_prepared, protocol_file, tmp_path, capfd):
    cli = _load_cli()
    assert cli.main(["--checkpoint", str(tmp_path / "missing.pt"), "--data", str(grid_prepared), "--protocol",
                     str(protocol_file), "--out", str(tmp_path / "o"), "--gpu", "-1"]) == 1
    errors = [line for line in capfd.readouterr().err.splitlines() if " ERROR " in line]
    assert len(errors) == 1 and "checkpoint not found" in errors[0]
    with pytest.raises(SystemExit):
        cli.parse_args(["--out", "x"])  # nothing to evaluate


def test_cli_config_overrides_in_every_form_are_validated():
    from avsr.config import Config, ConfigError

    cli = _load_cli()
    args, overrides = cli.parse_args(["--checkpoint", "a.pt", "decode.ctc_weight=0.3", "--data", "d", "--protocol",
                                      "p.json", "--out", "o", "--decode.beam_size", "10",
                                      "--decode.length_penalty=-0.5"])
    assert args.checkpoint == ["a.pt"]
    cfg = cli.apply_overrides(Config(), overrides)
    assert (cfg.decode.ctc_weight, cfg.decode.beam_size, cfg.decode.length_penalty) == (0.3, 10, -0.5)
    assert cfg.decode.lm_weight == 0.0  # untouched keys keep the checkpoint's values
    with pytest.raises(ConfigError, match="Did you mean 'beam_size'"):
        cli.apply_overrides(Config(), ["decode.beam_sise=3"])
    with pytest.raises(SystemExit):
        cli.parse_args(["--merge", "r", "--out", "o", "stray"])


def test_runner_reports_and_skips_an_unreadable_clip(grid_prepared, tiny_checkpoint, protocol_file, tmp_path, caplog):
    from avsr.config import DecodeConfig
    from avsr.corruption import OccluderBank, WaveBank, load_protocol
    from avsr.data.manifest import read_manifest
    from avsr.decoding import Recognizer
    from avsr.evaluation.runner import evaluate_conditions
    from avsr.training.checkpoint import load_model

    root = tmp_path / "root"
    shutil.copytree(grid_prepared, root)
    rows = read_manifest(root, "test")
    rows[0].file(root, ".mp4").write_bytes(b"not a video")
    model, tokenizer, cfg = load_model(tiny_checkpoint)
    out = evaluate_conditions(Recognizer(model, tokenizer, DecodeConfig(method="greedy")), root, rows,
                              load_protocol(protocol_file), ["clean", "occlusion"], OccluderBank.builtin(),
                              WaveBank.from_manifest(root, "test"), cfg.data, "sys", batch_size=2)
    for result in out.values():
        assert result.metrics["n_skipped"] == 1 and result.metrics["n_utterances"] == len(rows) - 1
        assert rows[0].utt_id not in {r.utt_id for r in result.hypotheses}
    assert str(rows[0].file(root, ".mp4")) in caplog.text


def test_runner_decodes_conditions_with_the_same_inputs_once(grid_prepared, tiny_checkpoint, protocol_file):
    from dataclasses import replace

    import torch

    from avsr.config import DecodeConfig
    from avsr.corruption import OccluderBank, WaveBank, load_protocol
    from avsr.data.manifest import read_manifest
    from avsr.decoding import Recognizer
    from avsr.evaluation.runner import evaluate_conditions
    from avsr.models import build_model
    from avsr.training.checkpoint import load_model

    _, tokenizer, cfg = load_model(tiny_checkpoint)
    rows = read_manifest(grid_prepared, "test")
    conditions = ["clean", "occlusion", "babble_snr0", "occlusion+babble_snr0"]
    for mode, shared in (("audio", {"occlusion": "clean", "occlusion+babble_snr0": "babble_snr0"}),
                         ("video", {"babble_snr0": "clean", "occlusion+babble_snr0": "occlusion"}),
                         ("audiovisual", {})):
        torch.manual_seed(0)
        model = build_model(replace(cfg.model, mode=mode, mouth_opening_weight=0.0, lip2speech_weight=0.0),
                            tokenizer.vocab_size).eval()
        recognizer = Recognizer(model, tokenizer, DecodeConfig(method="greedy"))
        calls = []
        decode = recognizer.decode_batch
        recognizer.decode_batch = lambda batch: calls.append(batch) or decode(batch)
        out = evaluate_conditions(recognizer, grid_prepared, rows, load_protocol(protocol_file), conditions,
                                  OccluderBank.builtin(), WaveBank.from_manifest(grid_prepared, "test"), cfg.data,
                                  mode, batch_size=len(rows))
        assert list(out) == conditions
        assert len(calls) == len(conditions) - len(shared)
        for cond, source in shared.items():
            assert out[cond] is out[source]


def test_train_lm_script_then_shallow_fusion_in_the_cli(grid_prepared, tiny_checkpoint, protocol_file, tmp_path):
    spec = importlib.util.spec_from_file_location("train_lm_cli", REPO / "scripts" / "train_lm.py")
    train_lm_cli = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(train_lm_cli)
    lm_path = tmp_path / "lm.pt"
    assert train_lm_cli.main(["--data", str(grid_prepared), "--checkpoint", str(tiny_checkpoint), "--out",
                              str(lm_path), "--steps", "5", "--d-model", "32", "--num-layers", "1",
                              "--ffn-dim", "32"]) == 0
    out = tmp_path / "fused"
    rc = _load_cli().main(["--checkpoint", str(tiny_checkpoint), "--data", str(grid_prepared), "--protocol",
                           str(protocol_file), "--conditions", "clean", "--out", str(out), "--gpu", "-1",
                           "--decode.beam_size=2", "--decode.max_len_ratio=0.2", f"--decode.lm_path={lm_path}",
                           "--decode.lm_weight=0.5"])
    assert rc == 0
    decode = json.loads((out / "results.json").read_text())["systems"]["audiovisual_relscore"]["decode"]
    assert decode["lm_weight"] == 0.5 and decode["lm_path"] == str(lm_path)


def _without_heads(checkpoint: Path, out: Path) -> Path:
    """``checkpoint`` with its auxiliary heads removed (weights and config): recognition weights unchanged."""
    import torch

    state = torch.load(checkpoint, map_location="cpu", weights_only=True)
    state["model"] = {k: v for k, v in state["model"].items() if not k.startswith("aux_heads.")}
    state["config"]["model"].update(mouth_opening_weight=0.0, lip2speech_weight=0.0)
    torch.save(state, out)
    return out


def test_cli_scores_the_auxiliary_heads_and_leaves_models_without_them_as_before(grid_prepared, tiny_checkpoint,
                                                                               protocol_file, tmp_path):
    from avsr.evaluation.report import RESULT_KEYS
    from avsr.training.checkpoint import load_model

    plain = _without_heads(tiny_checkpoint, tmp_path / "noheads.pt")
    assert len(load_model(plain)[0].aux_heads) == 0
    out = tmp_path / "aux"
    rc = _load_cli().main(["--checkpoint", str(tiny_checkpoint), str(plain), "--data", str(grid_prepared),
                           "--protocol", str(protocol_file), "--conditions", "clean", "babble_snr0", "--out", str(out),
                           "--gpu", "-1", "--decode.method=greedy", "--griffin-lim-iters", "4"])
    assert rc == 0
    systems = json.loads((out / "results.json").read_text())["systems"]
    heads = systems[f"audiovisual_relscore ({tiny_checkpoint.stem})"]["conditions"]
    none = systems["audiovisual_relscore (noheads)"]["conditions"]
    for cond in ("clean", "babble_snr0"):
        mouth = heads[cond]["aux"]["mouth_opening"]
        assert mouth["n_utterances"] == 3 and 0 < mouth["n_frames"] <= 3 * 75
        assert set(mouth["sources"]) == {"video", "audio"}
        for part in (mouth["pooled"], mouth["utterance_mean"], *(v["pooled"] for v in mouth["sources"].values())):
            assert -1.0 <= part["pearson"] <= 1.0 and 0.0 <= part["mae"] < 1.0 and part["r2"] <= 1.0
        # a model without heads: the very metrics it had before the aux block existed
        assert set(none[cond]) == {*RESULT_KEYS, "n_skipped"}
        assert {k: none[cond][k] for k in ("wer", "cer", "n_words")} == {k: heads[cond][k] for k in ("wer", "cer", "n_words")}
    speech = heads["clean"]["aux"]["lip2speech"]  # lip-to-speech only in --aux-conditions (default: clean)
    assert "lip2speech" not in heads["babble_snr0"]["aux"]
    assert speech["n_utterances"] == 3 and speech["griffin_lim_iters"] == 4
    assert -1.0 <= speech["stoi"] <= 1.0 and -1.0 <= speech["estoi"] <= 1.0
    report = (out / "report.md").read_text()
    table = report.split("## Auxiliary heads")[1].split("\n## ")[0]
    assert f"| audiovisual_relscore ({tiny_checkpoint.stem}) | clean | clean | " in table
    assert "noheads" not in table and sum(line.startswith("| ") for line in table.splitlines()) == 1 + 2


def test_aux_conditions_option_picks_where_lip_to_speech_is_scored():
    cli = _load_cli()
    protocol, conds = ["clean", "occlusion", "babble_snr0"], ["clean", "occlusion"]
    assert cli.speech_conditions_of(["clean"], protocol, conds) == ["clean"]
    assert cli.speech_conditions_of(["clean"], ["occlusion"], ["occlusion"]) == []  # default, no clean condition
    assert cli.speech_conditions_of(["all"], protocol, conds) == conds
    assert cli.speech_conditions_of(["none"], protocol, conds) == []
    assert cli.speech_conditions_of(["babble_snr0"], protocol, conds) == []  # not evaluated
    with pytest.raises(ValueError, match="unknown condition"):
        cli.speech_conditions_of(["blur"], protocol, conds)
    with pytest.raises(SystemExit):
        cli.parse_args(["--merge", "r", "--out", "o", "--aux-conditions", "all", "clean"])
