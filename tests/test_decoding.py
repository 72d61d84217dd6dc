"""Decoding: greedy CTC, the vectorised CTC prefix scorer, the batched beam search against the
unbatched reference (``decoding_reference.py``) on real GRID clips, and the shallow-fusion LM."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from avsr.config import DataConfig, DecodeConfig, ModelConfig
from avsr.data.dataset import Sample, collate
from avsr.data.manifest import read_manifest
from avsr.data.transforms import Clip, build_transform
from avsr.decoding import BeamSearch, CTCPrefixScorer, LMConfig, Recognizer, TransformerLM, ctc_greedy_search
from avsr.decoding.beam_search import select_rows
from avsr.decoding.lm import evaluate_lm, load_lm, save_lm, train_lm
from avsr.models import build_model
from avsr.models.decoder import TransformerDecoder
from avsr.text import CharTokenizer
from decoding_reference import _ctc_extend, _ctc_initial, _RefHyp, reference_beam_search

TINY = ModelConfig(mode="audiovisual", visual_width=8, audio_width=8, frontend_dim=64, relscore_layers=1,
                   d_model=64, num_heads=4, ffn_dim=128, num_layers=2, conv_kernel=7, dropout=0.0,
                   decoder_layers=2, decoder_ffn_dim=128)


# ----------------------------------------------------------------------------------- greedy CTC


def test_greedy_ctc_merges_repeats_drops_blanks_and_stops_at_the_length():
    path = torch.tensor([[3, 3, 0, 3, 4, 4, 0, 0, 5, 5], [2, 0, 2, 2, 0, 0, 7, 7, 7, 1]])
    log_probs = F.one_hot(path, 8).float().log()
    assert ctc_greedy_search(log_probs, torch.tensor([10, 4])) == [[3, 3, 4, 5], [2, 2]]


# ------------------------------------------------------------------------------ prefix scoring


def _random_log_probs(B, T, V, seed=0, scale=3.0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(B, T, V, generator=g) * scale).log_softmax(-1)


def _extend_path(scorer, tokens_per_utt):
    """The scorer state after feeding each utterance's tokens (one hypothesis per utterance)."""
    state = scorer.initial_state(1)
    for i in range(len(tokens_per_utt[0])):
        tok = torch.tensor([[t[i]] for t in tokens_per_utt])
        psi = scorer.score(state, tok[..., None])[..., 0]
        state = scorer.extend(state, torch.zeros_like(tok), tok, psi)
    return state


def test_eos_score_is_the_ctc_likelihood_of_the_prefix():
    B, T, V, eos = 2, 14, 7, 6
    lp = _random_log_probs(B, T, V)
    lengths = torch.tensor([14, 9])
    labels = [[1, 2, 2, 3], [3, 3, 1, 5]]  # repeats need a blank in between
    scorer = CTCPrefixScorer(lp, lengths, blank_id=0, eos_id=eos)
    state = _extend_path(scorer, labels)
    psi_end = scorer.score(state)[:, 0, eos]
    for b in range(B):
        nll = F.ctc_loss(lp[b:b + 1, :lengths[b]].transpose(0, 1).double(), torch.tensor([labels[b]]),
                         lengths[b:b + 1], torch.tensor([4]), reduction="sum")
        assert psi_end[b].item() == pytest.approx(-nll.item(), abs=1e-9)


def test_prefix_scores_match_the_frame_by_frame_recursion():
    T, V, eos = 12, 6, 5
    lp = _random_log_probs(1, T, V, seed=1)
    x = lp[0].double().numpy()
    scorer = CTCPrefixScorer(lp, torch.tensor([T]), blank_id=0, eos_id=eos)
    state = _extend_path(scorer, [[2, 2, 4]])
    ref = _RefHyp((), 0.0, _ctc_initial(x, 0), 0.0)
    for tok in (2, 2, 4):
        psi, r = _ctc_extend(x, ref, np.array([tok]), 0)
        ref = _RefHyp(ref.tokens + (tok,), 0.0, r[:, :, 0], float(psi[0]))
    content = np.array([1, 2, 3, 4])  # includes the repeat of the last token (4)
    psi_ref, _ = _ctc_extend(x, ref, content, 0)
    psi = scorer.score(state)[0, 0]
    np.testing.assert_allclose(psi[content].numpy(), psi_ref, rtol=1e-6)  # float32 log-sum-exp over frames
    assert state.psi.item() == pytest.approx(ref.psi, rel=1e-6)
    assert psi[0].item() == -math.inf  # the blank is never a label


def test_extension_probabilities_sum_to_the_prefix_probability():
    # every labelling that starts with g either is g (<eos>) or continues with one label c; the
    # CTC head must then give <eos> no mass as a label (a trained one learns that; force it here)
    T, V, eos = 10, 6, 5
    logits = torch.randn(1, T, V, generator=torch.Generator().manual_seed(2)) * 3
    logits[..., eos] = -1e4
    scorer = CTCPrefixScorer(logits.double().log_softmax(-1), torch.tensor([T]), blank_id=0, eos_id=eos)
    state = _extend_path(scorer, [[3, 1]])
    psi = scorer.score(state)[0, 0]
    assert torch.logsumexp(psi[1:], 0).item() == pytest.approx(state.psi.item(), abs=1e-5)


def test_padded_frames_are_ignored():
    lp = _random_log_probs(1, 9, 5, seed=3)
    padded = torch.cat([lp, _random_log_probs(1, 4, 5, seed=4)], 1)
    a = CTCPrefixScorer(lp, torch.tensor([9]), 0, 4)
    b = CTCPrefixScorer(padded, torch.tensor([9]), 0, 4)
    sa, sb = _extend_path(a, [[1, 2]]), _extend_path(b, [[1, 2]])
    torch.testing.assert_close(a.score(sa), b.score(sb), rtol=1e-12, atol=0)


def test_prefix_scorer_rejects_bad_input():
    lp = _random_log_probs(2, 5, 4)
    with pytest.raises(ValueError, match="lengths"):
        CTCPrefixScorer(lp, torch.tensor([5, 6]), 0, 3)
    with pytest.raises(ValueError, match="finite"):
        CTCPrefixScorer(lp.masked_fill(lp < lp.mean(), -math.inf), torch.tensor([5, 5]), 0, 3)
    with pytest.raises(ValueError, match="distinct"):
        CTCPrefixScorer(lp, torch.tensor([5, 5]), 3, 3)


# --------------------------------------------------------------------------------- beam search


def _toy_decoder(V=11, D=32, seed=0):
    torch.manual_seed(seed)
    dec = TransformerDecoder(V, D, num_heads=4, ffn_dim=64, num_layers=2).eval()
    with torch.no_grad():
        dec.output.weight.mul_(10.0)  # peaky enough to make the search non-trivial
    return dec


def _assert_same(batched, reference, atol=2e-4):
    assert [h.tokens for h in batched] == [r[0] for r in reference]
    for h, (_, score) in zip(batched, reference):
        assert h.score == pytest.approx(score, abs=atol)


@pytest.mark.parametrize("kw", [
    dict(beam_size=4, ctc_weight=0.3),
    dict(beam_size=3, ctc_weight=0.5, length_penalty=0.5, nbest=2),
    dict(beam_size=6, ctc_weight=0.1, max_len_ratio=0.3, nbest=3),
    dict(beam_size=5, ctc_weight=0.0),
    dict(beam_size=5, ctc_weight=1.0),
], ids=["ctc0.3", "penalty", "maxlen", "attention-only", "ctc-only"])
def test_batched_search_equals_reference_on_random_encodings(kw):
    V, D = 11, 32
    dec = _toy_decoder(V, D)
    g = torch.Generator().manual_seed(1)
    lengths = torch.tensor([20, 13, 17])
    enc = torch.randn(3, 20, D, generator=g)
    lp = (torch.randn(3, 20, V, generator=g) * 3).log_softmax(-1)
    out = BeamSearch(dec, V, V - 1, V - 1, 0, **kw)(enc, lengths, lp)
    for b in range(3):
        ref = reference_beam_search(dec, enc[b, :lengths[b]], lp[b, :lengths[b]], vocab_size=V, sos_id=V - 1,
                                    eos_id=V - 1, **kw)
        _assert_same(out[b], ref)


def test_batched_search_with_lm_fusion_equals_reference():
    V, D = 11, 32
    dec = _toy_decoder(V, D)
    torch.manual_seed(5)
    lm = TransformerLM(LMConfig(V, d_model=32, num_heads=2, num_layers=2, ffn_dim=64, dropout=0.0)).eval()
    g = torch.Generator().manual_seed(2)
    enc, lp = torch.randn(2, 16, D, generator=g), (torch.randn(2, 16, V, generator=g) * 3).log_softmax(-1)
    kw = dict(beam_size=4, ctc_weight=0.2, lm=lm, lm_weight=0.5)
    out = BeamSearch(dec, V, V - 1, V - 1, 0, **kw)(enc, torch.tensor([16, 16]), lp)
    without = BeamSearch(dec, V, V - 1, V - 1, 0, beam_size=4, ctc_weight=0.2)(enc, torch.tensor([16, 16]), lp)
    for b in range(2):
        _assert_same(out[b], reference_beam_search(dec, enc[b], lp[b], vocab_size=V, sos_id=V - 1, eos_id=V - 1, **kw))
    assert [h[0].score for h in out] != [h[0].score for h in without]


def test_hypotheses_respect_the_length_limit_and_hold_no_special_tokens():
    V, D = 11, 32
    dec = _toy_decoder(V, D)
    enc = torch.randn(2, 20, D)
    lp = torch.randn(2, 20, V).log_softmax(-1)
    # a large per-token bonus makes longer always better: only the limit stops the search
    search = BeamSearch(dec, V, V - 1, V - 1, 0, beam_size=4, ctc_weight=0.1, max_len_ratio=0.25, nbest=4,
                        length_penalty=10.0)
    out = search(enc, torch.tensor([20, 12]), lp)
    assert search.max_lengths(torch.tensor([20, 12])).tolist() == [5, 3]
    for hyps, limit in zip(out, [5, 3]):
        assert len(hyps) == 4 and len(hyps[0].tokens) == limit
        assert all(len(h.tokens) <= limit and 0 not in h.tokens and V - 1 not in h.tokens for h in hyps)
        assert [h.score for h in hyps] == sorted((h.score for h in hyps), reverse=True)


def test_select_rows_reorders_nested_caches():
    idx = torch.tensor([2, 0])
    rows = torch.arange(3)[:, None].float()
    cache = {"a": [rows, (rows * 2, None)], "b": rows}
    out = select_rows(cache, idx)
    assert out["a"][0][:, 0].tolist() == [2, 0] and out["a"][1][0][:, 0].tolist() == [4, 0]
    assert out["a"][1][1] is None and out["b"][:, 0].tolist() == [2, 0]


@pytest.mark.parametrize("kw, match", [
    (dict(beam_size=0), "beam_size"), (dict(nbest=5, beam_size=4), "nbest"), (dict(ctc_weight=1.5), "ctc_weight"),
    (dict(lm_weight=0.3), "LM"), (dict(max_len_ratio=0.0), "max_len_ratio"),
])
def test_beam_search_rejects_bad_arguments(kw, match):
    with pytest.raises(ValueError, match=match):
        BeamSearch(_toy_decoder(), 11, 10, 10, 0, **kw)


# ------------------------------------------------------------------------ real GRID clips


@pytest.fixture(scope="module")
def grid_encoded(grid_prepared):
    """A tiny untrained model (fixed seed) and its encoder outputs on 3 real GRID test clips."""
    from avsr.data.media import load_clip

    rows = read_manifest(grid_prepared, "test")[:3]
    transform = build_transform(DataConfig(), train=False)
    samples = []
    for row in rows:
        frames, wave, meta = load_clip(grid_prepared, row)
        clip = transform(Clip(frames, np.asarray(meta["landmarks"], np.float32), wave), np.random.default_rng(0))
        samples.append(Sample(row.utt_id, row.transcript, clip.video, clip.audio[:640 * len(frames)],
                              np.zeros(1, np.int64), clip.landmarks, np.asarray(meta["mouth_opening"], np.float32)))
    batch = collate(samples)
    tokenizer = CharTokenizer.train(r.transcript for r in read_manifest(grid_prepared, "train"))
    torch.manual_seed(0)
    model = build_model(TINY, tokenizer.vocab_size).eval()
    with torch.no_grad():
        encoded = model.encode(batch.video, batch.video_lengths, batch.audio, batch.audio_lengths)
        lp = model.ctc_head(encoded.enc)
    return model, tokenizer, batch, encoded.enc, encoded.enc_lengths, lp


@pytest.mark.parametrize("kw", [
    dict(beam_size=4, ctc_weight=0.1, max_len_ratio=0.4),
    dict(beam_size=8, ctc_weight=0.3, nbest=3, length_penalty=0.2, max_len_ratio=0.3),
], ids=["beam4", "beam8-nbest3"])
def test_batched_search_equals_reference_on_real_grid_clips(grid_encoded, kw):
    model, tok, _, enc, lengths, lp = grid_encoded
    out = BeamSearch(model.decoder, tok.vocab_size, tok.sos_id, tok.eos_id, tok.blank_id, **kw)(enc, lengths, lp)
    for b in range(enc.shape[0] if kw["beam_size"] < 8 else 2):  # the reference is slow: 2 clips at beam 8
        n = int(lengths[b])
        ref = reference_beam_search(model.decoder, enc[b, :n], lp[b, :n], vocab_size=tok.vocab_size,
                                    sos_id=tok.sos_id, eos_id=tok.eos_id, blank_id=tok.blank_id, **kw)
        _assert_same(out[b], ref)


def test_decoding_is_deterministic_and_independent_of_the_batch(grid_encoded):
    model, tok, _, enc, lengths, lp = grid_encoded
    search = BeamSearch(model.decoder, tok.vocab_size, tok.sos_id, tok.eos_id, beam_size=6, ctc_weight=0.1,
                        max_len_ratio=0.4, nbest=2)
    first, second = search(enc, lengths, lp), search(enc, lengths, lp)
    assert first == second
    alone = search(enc[1:2, :int(lengths[1])], lengths[1:2], lp[1:2, :int(lengths[1])])
    assert [h.tokens for h in alone[0]] == [h.tokens for h in first[1]]
    assert [h.score for h in alone[0]] == pytest.approx([h.score for h in first[1]], abs=1e-4)


def test_recognizer_decodes_batches_to_text_with_greedy_and_beam(grid_encoded):
    model, tok, batch, enc, lengths, lp = grid_encoded
    greedy = Recognizer(model, tok, DecodeConfig(method="greedy"))(batch)
    assert greedy == [tok.decode(p) for p in ctc_greedy_search(lp, lengths)]
    beam = Recognizer(model, tok, DecodeConfig(beam_size=3, max_len_ratio=0.4))
    texts = beam(batch)
    assert len(texts) == len(batch) and texts == beam(batch)
    with pytest.raises(ValueError, match="method"):
        Recognizer(model, tok, DecodeConfig(method="viterbi"))


# ------------------------------------------------------------------------------------------ LM


def test_lm_incremental_steps_equal_the_full_forward():
    torch.manual_seed(0)
    lm = TransformerLM(LMConfig(13, d_model=32, num_heads=4, num_layers=2, ffn_dim=64)).eval()
    ys = torch.randint(1, 12, (3, 7))
    ys[:, 0] = 12
    full = lm(ys).log_softmax(-1)
    cache = None
    for i in range(1, 8):
        step, cache = lm.forward_step(ys[:, :i], cache)
        torch.testing.assert_close(step, full[:, i - 1], rtol=1e-5, atol=1e-5)
        cache = select_rows(cache, torch.arange(3))


def test_lm_learns_grid_transcripts_and_round_trips(grid_prepared, tmp_path):
    tok = CharTokenizer.train(r.transcript for r in read_manifest(grid_prepared, "train"))
    train = [tok.encode(r.transcript) for r in read_manifest(grid_prepared, "train")]
    valid = [tok.encode(r.transcript) for r in read_manifest(grid_prepared, "test")]
    torch.manual_seed(0)
    lm = TransformerLM(LMConfig(tok.vocab_size, d_model=64, num_heads=4, num_layers=2, ffn_dim=128, dropout=0.0))
    before = evaluate_lm(lm, valid, sos_id=tok.sos_id, eos_id=tok.eos_id)
    after = train_lm(lm, train, valid, sos_id=tok.sos_id, eos_id=tok.eos_id, steps=60, batch_size=16, lr=3e-3)
    # it fits the training transcripts, and GRID's fixed grammar carries over to unseen sentences
    assert evaluate_lm(lm, train, sos_id=tok.sos_id, eos_id=tok.eos_id) < 1.0
    assert after < min(before, math.log(tok.vocab_size))
    save_lm(tmp_path / "lm.pt", lm, tok.to_bytes(), 60, after)
    loaded, tok_bytes = load_lm(tmp_path / "lm.pt")
    assert tok_bytes == tok.to_bytes()
    assert evaluate_lm(loaded, valid, sos_id=tok.sos_id, eos_id=tok.eos_id) == pytest.approx(after, abs=1e-5)
    with pytest.raises(ValueError, match="not found"):
        load_lm(tmp_path / "missing.pt")


def test_recognizer_refuses_an_lm_of_another_tokenizer(grid_encoded, tmp_path):
    model, tok, *_ = grid_encoded
    other = CharTokenizer(list("ABC"))
    save_lm(tmp_path / "lm.pt", TransformerLM(LMConfig(other.vocab_size, d_model=16, num_heads=2, num_layers=1,
                                                       ffn_dim=16)), other.to_bytes(), 0, 0.0)
    with pytest.raises(ValueError, match="another tokenizer"):
        Recognizer(model, tok, DecodeConfig(lm_path=str(tmp_path / "lm.pt"), lm_weight=0.3))
