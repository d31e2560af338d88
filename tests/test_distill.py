"""The KD loss against hand computation, and mutual distillation touching only LoRA weights."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from cloud.training.distill import mutual_distillation
from common.ml.kd import kd_loss
from common.ml.lora import attach_lora
from common.ml.tokenizer import load_hf_tokenizer, save_tokenizer, train_tokenizer
from common.protocol import DistillSpec, LoraSpec
from cotune.demo.synthetic import all_text, make_suite
from cotune.demo.tiny import build_tiny_model

VOCAB = 512


def _hand_kl(student: torch.Tensor, teacher: torch.Tensor, mask, temperature: float):
    # Explicit sum p * (log p - log q) per position, mean over kept positions, times T^2.
    p = torch.softmax(teacher / temperature, dim=-1)
    q = torch.softmax(student / temperature, dim=-1)
    per_position = (p * (p.log() - q.log())).sum(-1)
    if mask is None:
        return per_position.mean() * temperature**2
    return per_position[mask].mean() * temperature**2


@pytest.mark.parametrize("temperature", [1.0, 2.0])
@pytest.mark.parametrize("use_mask", [False, True])
def test_kd_loss_matches_hand_computation(temperature: float, use_mask: bool) -> None:
    gen = torch.Generator().manual_seed(0)
    student = torch.randn(2, 5, 11, generator=gen)
    teacher = torch.randn(2, 5, 11, generator=gen) * 3
    mask = torch.tensor([[1, 1, 0, 0, 1], [0, 1, 1, 1, 0]], dtype=torch.bool) if use_mask else None
    got = kd_loss(student, teacher, mask, temperature=temperature)
    assert got.item() == pytest.approx(_hand_kl(student, teacher, mask, temperature).item(), rel=1e-5)
    # Cross-check with torch's own KL (batchmean over the kept positions).
    s = student[mask] if use_mask else student.reshape(-1, 11)
    t = teacher[mask] if use_mask else teacher.reshape(-1, 11)
    ref = F.kl_div(
        F.log_softmax(s / temperature, -1),
        F.log_softmax(t / temperature, -1),
        log_target=True,
        reduction="batchmean",
    ) * temperature**2
    assert got.item() == pytest.approx(ref.item(), rel=1e-5)


def test_kd_loss_top_k() -> None:
    gen = torch.Generator().manual_seed(1)
    student = torch.randn(3, 4, 9, generator=gen)
    teacher = torch.randn(3, 4, 9, generator=gen)
    mask = torch.ones(3, 4, dtype=torch.bool)
    mask[0, 0] = False
    k, temp = 3, 2.0
    values, index = (teacher / temp).topk(k, dim=-1)
    p = torch.softmax(values, dim=-1)  # teacher renormalised over its top k
    log_q = torch.log_softmax(student / temp, dim=-1).gather(-1, index)  # full student softmax
    expected = ((p * (p.log() - log_q)).sum(-1))[mask].mean() * temp**2
    got = kd_loss(student, teacher, mask, temperature=temp, top_k=k)
    assert got.item() == pytest.approx(expected.item(), rel=1e-5)
    assert got.item() >= 0
    # top_k >= vocab is the full KL.
    full = kd_loss(student, teacher, mask, temperature=temp)
    assert kd_loss(student, teacher, mask, temp, top_k=9).item() == pytest.approx(full.item())


def test_kd_loss_gradients_reach_only_the_student() -> None:
    student = torch.randn(1, 3, 7, requires_grad=True)
    teacher = torch.randn(1, 3, 7, requires_grad=True)
    loss = kd_loss(student, teacher, torch.ones(1, 3, dtype=torch.bool))
    loss.backward()
    assert teacher.grad is None
    assert student.grad is not None and student.grad.abs().sum() > 0
    # A batch with nothing to distil is a zero, not a NaN.
    zero = kd_loss(student, teacher, torch.zeros(1, 3, dtype=torch.bool))
    assert zero.item() == 0.0
    with pytest.raises(ValueError, match="share a vocabulary"):
        kd_loss(torch.randn(1, 2, 5), torch.randn(1, 2, 6), None)


@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_sparse_kd_loss_is_kd_loss_against_its_support(temperature: float) -> None:
    """A teacher given as (ids, probabilities), with an id named twice and a slot left empty, is the
    dense teacher whose logits are log p on those ids and nothing elsewhere."""
    from common.ml.kd import kd_loss_sparse

    gen = torch.Generator().manual_seed(2)
    student = torch.randn(2, 3, 10, generator=gen)
    ids = torch.tensor([[[1, 4, 4], [0, 2, 9], [3, 5, 7]], [[6, 6, 6], [2, 8, 1], [9, 0, 3]]])
    probs = torch.tensor([[[0.5, 0.3, 0.0], [0.2, 0.2, 0.6], [0.1, 0.1, 0.8]],
                          [[1.0, 0.0, 0.0], [0.3, 0.3, 0.4], [0.25, 0.25, 0.5]]])
    mask = torch.tensor([[True, True, False], [True, True, True]])
    dense = torch.full((2, 3, 10), -1.0e4)
    for b in range(2):
        for t in range(3):
            mass = torch.zeros(10).index_add_(0, ids[b, t], probs[b, t])
            dense[b, t] = torch.where(mass > 0, (mass / mass.sum()).log(), dense[b, t])
    got = kd_loss_sparse(student, ids, probs, mask, temperature)
    assert got.item() == pytest.approx(kd_loss(student, dense, mask, temperature).item(), rel=1e-5)


def test_labelled_logits_distil_as_full_logits(setup) -> None:
    """The head at reply positions only gives the same losses and the same adapters as at every
    position, up to float rounding."""
    suite, tokenizer = setup
    results = []
    for labelled in (False, True):
        llm = attach_lora(build_tiny_model("llama", "small", VOCAB, seed=1), LoraSpec(r=4), seed=0)
        slm = attach_lora(build_tiny_model("llama", "tiny", VOCAB, seed=2), LoraSpec(r=4), seed=0)
        spec = DistillSpec(batch_size=8, lr=1e-2, lambda_kd=1.0, temperature=2.0, max_steps=3,
                           labelled_logits=labelled)
        report = mutual_distillation(llm, slm, tokenizer, suite.aux, spec, seed=0)
        results.append((report, _snapshot(slm), _snapshot(llm)))
    (full, full_slm, full_llm), (kept, kept_slm, kept_llm) = results
    for key in ("slm_loss_first", "slm_kd_mean", "llm_loss_first", "llm_loss_last"):
        assert kept[key] == pytest.approx(full[key], rel=1e-4), key
    for a, b in ((full_slm, kept_slm), (full_llm, kept_llm)):
        assert all(torch.allclose(a[n], b[n], atol=1e-5) for n in a)
    assert "labelled_logits" not in DistillSpec().model_dump()  # the default goes unsaid


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory):
    suite = make_suite(num_clients=1, seed=0, per_client=20, public_size=20, aux_size=16)
    tok_dir = save_tokenizer(train_tokenizer(all_text(suite), VOCAB), tmp_path_factory.mktemp("t"))
    return suite, load_hf_tokenizer(tok_dir)


def _snapshot(model) -> dict[str, torch.Tensor]:
    return {name: p.detach().clone() for name, p in model.named_parameters()}


def test_one_mutual_distillation_step_changes_only_lora(setup) -> None:
    suite, tokenizer = setup
    llm = attach_lora(build_tiny_model("llama", "small", VOCAB, seed=1), LoraSpec(r=4), seed=0)
    slm = attach_lora(build_tiny_model("llama", "tiny", VOCAB, seed=2), LoraSpec(r=4), seed=0)
    before = {"llm": _snapshot(llm), "slm": _snapshot(slm)}
    spec = DistillSpec(batch_size=8, lr=1e-2, lambda_kd=1.0, temperature=2.0, max_steps=1)
    report = mutual_distillation(llm, slm, tokenizer, suite.aux, spec, seed=0)
    assert report["steps"] == 1
    for side in ("slm", "llm"):
        assert report[f"{side}_loss_first"] > 0 and report[f"{side}_kd_mean"] >= 0
    for side, model in (("llm", llm), ("slm", slm)):
        assert not model.training
        changed_lora = 0
        for name, param in model.named_parameters():
            old = before[side][name]
            if "lora_" in name:
                changed_lora += int(not torch.equal(old, param))
            else:
                assert torch.equal(old, param), f"{side} base weight {name} changed"
        # B starts at zero, so step one moves every B (A's gradient is zero then).
        n_b = sum("lora_B" in n for n, _ in model.named_parameters())
        assert changed_lora >= n_b > 0, side


def test_mutual_distillation_refuses_different_vocabularies(setup) -> None:
    suite, tokenizer = setup
    llm = attach_lora(build_tiny_model("llama", "tiny", VOCAB + 64), LoraSpec(r=2), seed=0)
    slm = attach_lora(build_tiny_model("llama", "tiny", VOCAB), LoraSpec(r=2), seed=0)
    with pytest.raises(ValueError, match="vocabularies differ"):
        mutual_distillation(llm, slm, tokenizer, suite.aux, DistillSpec(max_steps=1), seed=0)


def test_one_way_distillation_teaches_the_slm_and_leaves_the_llm_alone(setup) -> None:
    suite, tokenizer = setup
    llm = attach_lora(build_tiny_model("llama", "small", VOCAB, seed=1), LoraSpec(r=4), seed=0)
    slm = attach_lora(build_tiny_model("llama", "tiny", VOCAB, seed=2), LoraSpec(r=4), seed=0)
    before = {"llm": _snapshot(llm), "slm": _snapshot(slm)}
    spec = DistillSpec(batch_size=8, lr=1e-2, max_steps=2, direction="llm_to_slm")
    report = mutual_distillation(llm, slm, tokenizer, suite.aux, spec, seed=0)
    assert report["steps"] == 2 and "llm_loss_first" not in report
    assert all(torch.equal(before["llm"][n], p) for n, p in llm.named_parameters())
    assert any(not torch.equal(before["slm"][n], p) for n, p in slm.named_parameters() if "lora_B" in n)


def test_prompts_without_answers_are_answered_by_the_given_model(setup) -> None:
    from dataclasses import replace

    from cloud.training.pseudo_labels import label_with, unlabelled
    from common.ml.evaluate import generate_greedy

    suite, tokenizer = setup
    model = build_tiny_model("llama", "tiny", VOCAB, seed=3)
    records = [replace(r, response="") for r in suite.aux[:6]] + suite.aux[6:8]
    assert unlabelled(records) == list(range(6))
    labelled = label_with(model, tokenizer, records, max_new_tokens=4)
    answers = generate_greedy(model, tokenizer, [r.prompt for r in records[:6]], 4)
    # Answered records carry the model's own greedy answer (empty answers are left out); labelled ones stay.
    assert [r.response for r in labelled[:-2]] == [a for a in answers if a]
    assert labelled[-2:] == suite.aux[6:8]
    assert not unlabelled(labelled)
