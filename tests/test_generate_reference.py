"""Our generation loop against transformers' ``DiffusionGemmaForBlockDiffusion.generate``.

How the randomness is pinned: the loop draws randomness in three places, the initial
canvas (uniform token ids), the per-step sample of every position (categorical), and
the renoising of rejected positions (uniform token ids). A ``ReplayNoise`` table holds,
per canvas and step, the initial canvas, one uniform number per position and the
renoise tokens. Our loop reads it through its ``noise`` parameter. The reference reads
it through ``torch.randint`` and ``torch.multinomial``, patched for the duration of its
``generate``: randint returns the next canvas's initial tokens, or after a sampling step
that step's renoise tokens; multinomial inverts the CDF of the probabilities it is given
at the step's uniform numbers, which is exactly how our sampler draws.

Why short canvases: self-conditioning feeds each step's logits into the next, and on a
random model at low temperature this roughly doubles a float32 rounding difference per
step (1e-5 at step 1, 1e-3 by step 9). Two float32 implementations of the same loop
then part ways after a dozen steps on a near tie. The settings below let the confidence
stop end each canvas after three to six steps, so the comparison is exact; the
stability rule is checked against the reference's own class in test_sampler.py.
"""

import mlx.core as mx
import numpy as np
import pytest
import torch
from helpers import build_reference_model, save_checkpoint
from transformers.models.diffusion_gemma.generation_diffusion_gemma import EntropyBoundSamplerConfig

from mlx_diffgemma.generate import Canvas, generate_step
from mlx_diffgemma.sampler import DiffusionSettings
from mlx_diffgemma.utils import load_model

CANVAS, STEPS, CANVASES = 16, 12, 3


class ReplayNoise:
    def __init__(self, vocab_size: int, seed: int = 0):
        rng = np.random.default_rng(seed)
        self.init = rng.integers(0, vocab_size, (CANVASES, CANVAS))
        self.uniform = rng.random((CANVASES, STEPS, CANVAS)).astype(np.float32)
        self.tokens = rng.integers(0, vocab_size, (CANVASES, STEPS, CANVAS))

    def initial_canvas(self, canvas, shape):
        return mx.broadcast_to(mx.array(self.init[canvas], dtype=mx.int32), shape)

    def step(self, canvas, step, shape):
        uniform = mx.broadcast_to(mx.array(self.uniform[canvas, step]), shape)
        return uniform, mx.broadcast_to(mx.array(self.tokens[canvas, step], dtype=mx.int32), shape)


def pin_reference(monkeypatch, noise: ReplayNoise):
    state = {"canvas": -1, "step": 0, "sampled": False}

    def randint(low=0, high=None, size=None, device=None, **kwargs):
        if state["sampled"]:  # renoising after a sampling step
            out = noise.tokens[state["canvas"], state["step"]]
            state["step"] += 1
        else:  # the initial canvas of the next block
            state["canvas"] += 1
            state["step"] = 0
            out = noise.init[state["canvas"]]
        state["sampled"] = False
        return torch.tensor(out).expand(size)

    def multinomial(probs, num_samples):
        u = torch.tensor(noise.uniform[state["canvas"], state["step"]])
        index = (probs.cumsum(-1) < u[:, None]).sum(-1).clamp(max=probs.shape[-1] - 1)
        state["sampled"] = True
        return index[:, None]

    monkeypatch.setattr(torch, "randint", randint)
    monkeypatch.setattr(torch, "multinomial", multinomial)
    return state


@pytest.fixture(scope="module")
def models(tokenizer_dir, vocab_size, tmp_path_factory):
    """A reference model with a sharpened output (final norm scaled up) so that the
    confidence-based early stop fires at different steps in different canvases."""
    reference = build_reference_model(vocab_size, canvas_length=CANVAS, seed=11)
    with torch.no_grad():
        reference.model.decoder.norm.weight.mul_(4)
    path = save_checkpoint(reference, tokenizer_dir, tmp_path_factory.mktemp("gen"))
    return reference, load_model(path)


def run_ours(model, prompt, settings, eos, noise):
    tokens, steps, passes, valid = [], [], 0, 0
    for event in generate_step(model, [prompt], max_tokens=CANVASES * CANVAS, settings=settings,
                               eos_token_ids=eos, noise=noise):
        if isinstance(event, Canvas):
            tokens += event.tokens[0]
            steps.append(event.steps)
            passes += event.forward_passes[0]
            valid += event.valid_tokens[0]
    return tokens, steps, valid / passes


def run_reference(reference, prompt, settings, eos, noise, monkeypatch):
    state = pin_reference(monkeypatch, noise)
    out = reference.generate(
        torch.tensor([prompt]), max_new_tokens=CANVASES * CANVAS, max_denoising_steps=settings.steps,
        sampler_config=EntropyBoundSamplerConfig(entropy_bound=settings.entropy_bound), t_min=settings.t_min,
        t_max=settings.t_max, stability_threshold=settings.stability_threshold,
        confidence_threshold=settings.confidence_threshold, eos_token_id=eos or None, pad_token_id=0,
    )
    monkeypatch.undo()
    generated = out.sequences[0, len(prompt):].tolist()
    for i, token in enumerate(generated):
        if token in eos:
            generated = generated[:i]
            break
    return generated, state["canvas"] + 1, float(out.tokens_per_forward[0])


PROMPT = [2, 105, 300, 301, 302, 106, 10, 105, 20]


SETTINGS = DiffusionSettings(
    steps=STEPS, entropy_bound=1.0, confidence_threshold=3.0, stability_threshold=0, canvas_length=CANVAS
)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_pinned_generation_matches_reference_token_for_token(models, vocab_size, monkeypatch, seed):
    reference, model = models
    noise = ReplayNoise(vocab_size, seed=seed)
    ours, steps, ours_tpf = run_ours(model, PROMPT, SETTINGS, [], noise)
    theirs, canvases, theirs_tpf = run_reference(reference, PROMPT, SETTINGS, [], noise, monkeypatch)
    assert len(ours) == CANVASES * CANVAS and canvases == CANVASES
    assert ours == theirs
    assert ours_tpf == pytest.approx(theirs_tpf)
    assert max(steps) < STEPS and len(set(steps)) > 1  # the early stop fired, at varying steps


def test_pinned_generation_matches_reference_through_eos(models, vocab_size, monkeypatch):
    reference, model = models
    noise = ReplayNoise(vocab_size, seed=5)
    free_run, _, _ = run_ours(model, PROMPT, SETTINGS, [], noise)
    # An EOS id that first appears inside the third canvas.
    eos = next(t for t in free_run[2 * CANVAS + 3 :] if t not in free_run[: 2 * CANVAS + 3])
    ours, _, ours_tpf = run_ours(model, PROMPT, SETTINGS, [eos], noise)
    theirs, _, theirs_tpf = run_reference(reference, PROMPT, SETTINGS, [eos], noise, monkeypatch)
    assert 2 * CANVAS < len(ours) < CANVASES * CANVAS and eos not in ours
    assert ours == theirs and ours == free_run[: len(ours)]
    assert ours_tpf == pytest.approx(theirs_tpf)
