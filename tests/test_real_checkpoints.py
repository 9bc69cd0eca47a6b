"""What a user of a real LLaVA-1.5, BLIP-2 or CLAP checkpoint relies on (issue 20).

The checkpoints are tiny but laid out as the real ones (``real_checkpoints.py``): the real
processor classes at the real image sizes, the configs' special-token ids, the generation
configs. Each test names the defect it guards against.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

import real_checkpoints
from safe_cli.cli.main import app
from safe_cli.config import load_profile
from safe_cli.config.loader import ProfileError
from safe_cli.data.batches import PromptBatcher, Query, generate_answers
from safe_cli.data.prompts import PromptFormat, end_of_answer_ids
from safe_cli.errors import SafeError
from safe_cli.models import build_safe_model
from safe_cli.models.audio_encoders import ClapEncoder
from safe_cli.models.base import load_base_from_directory
from safe_cli.models.bypass import perturb_adapters
from safe_cli.models.probe import probe_audio

IMAGE = np.full((40, 50, 3), 128, np.uint8)


@pytest.fixture(scope="module")
def real(tmp_path_factory, tiny_checkpoints):
    """The two real-layout bases, beside the session's tiny whisper and CLAP (conftest)."""
    root = tmp_path_factory.mktemp("real")
    return {
        "llava": real_checkpoints.save_llava15_like(root / "llava-1.5"),
        "blip2": real_checkpoints.save_blip2_opt_like(root / "blip2-opt"),
        "whisper": tiny_checkpoints["whisper"],
        "clap": tiny_checkpoints["clap"],
        "root": root,
    }


def force_tokens(base, token_ids):
    """Make the base emit ``token_ids`` one per forward, whatever its weights (a hook on its LM head)."""
    calls = {"n": 0}

    def hook(module, args, output):
        step = min(calls["n"], len(token_ids) - 1)
        calls["n"] += 1
        output = output.clone()
        output[..., token_ids[step]] += 1e4
        return output

    return base.model.get_output_embeddings().register_forward_hook(hook), calls


# ---------------------------------------------------------------- 1. BLIP-2's answers end at its newline


def test_blip2_answer_ends_at_the_newline_its_generation_config_names(real):
    base = load_base_from_directory("hf-blip2", real["blip2"])
    assert base.end_ids == [50118]
    batcher = PromptBatcher(base)
    tokenizer = batcher.tokenizer
    # What OPT-2.7B does on a digit question: " 7", newline, then it would go on with "Question: ...".
    continuation = tokenizer(" 7\nQuestion: what", add_special_tokens=False)["input_ids"]
    assert 50118 in continuation
    handle, calls = force_tokens(base, continuation)
    try:
        answers = generate_answers(base.model, batcher, [Query("Which digit is shown?", IMAGE)], max_new_tokens=12)
    finally:
        handle.remove()
    assert answers == ["7"]  # with </s> (id 2) as the end it was "7\nQuestion: what"
    assert calls["n"] == continuation.index(50118) + 1  # generation stopped at the newline, not 12 tokens on


def test_blip2_training_answers_end_with_the_newline(real):
    batcher = PromptBatcher(load_base_from_directory("hf-blip2", real["blip2"]))
    batch = batcher.for_training([Query("Which digit is shown?", IMAGE, answer="7")])
    labelled = batch["input_ids"][0][batch["labels"][0] != -100].tolist()
    assert labelled[-1] == 50118 and 2 not in labelled
    assert batcher.tokenizer.decode(labelled) == " 7\n"


class _Config:
    def __init__(self, **values):
        self.__dict__.update(values)


def test_end_of_answer_ids_come_from_generation_then_text_config_then_tokenizer():
    tokenizer = _Config(eos_token_id=2)
    text_only = _Config(config=_Config(text_config=_Config(eos_token_id=50118)), generation_config=None)
    assert end_of_answer_ids(text_only, tokenizer) == [50118]
    listed = _Config(config=text_only.config, generation_config=_Config(eos_token_id=[50118, 2]))
    assert end_of_answer_ids(listed, tokenizer) == [50118, 2]
    bare = _Config(config=_Config(text_config=_Config(eos_token_id=None)), generation_config=None)
    assert end_of_answer_ids(bare, tokenizer) == [2]
    assert end_of_answer_ids(listed, tokenizer, override=[13]) == [13]


# ---------------------------------------------------------------- 2. LLaVA-1.5's prompt and answer length


def test_llava15_is_asked_in_its_short_answer_format_with_576_image_tokens(real):
    base = load_base_from_directory("hf-llava", real["llava"])
    batcher = PromptBatcher(base)
    query = Query("What is shown?", IMAGE)
    assert batcher.prompt(query) == ("USER: <image>\nWhat is shown?\nAnswer the question using a single word or "
                                     "phrase. ASSISTANT:")
    batch = batcher.for_generation([query, Query("Say yes.")])
    assert (batch["input_ids"] == 32000).sum(1).tolist() == [576, 0]
    assert batch["pixel_values"].shape[-2:] == (336, 336)
    labels = batcher.for_training([Query("What is shown?", IMAGE, answer="a cat")])["labels"][0]
    assert batcher.tokenizer.decode(labels[labels != -100]) == "a cat</s>"


def test_chat_template_renders_the_prompt_and_trains_on_each_reply(real):
    base = load_base_from_directory("hf-llava", real["llava"], prompt_template="chat")
    batcher = PromptBatcher(base)
    query = Query("Which digit?", IMAGE, answer="3", history=(("What is shown?", "a digit"),))
    rendered = base.processor.apply_chat_template(
        [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is shown?"}]},
         {"role": "assistant", "content": [{"type": "text", "text": "a digit"}]},
         {"role": "user", "content": [{"type": "text", "text": "Which digit?"}]}],
        add_generation_prompt=True, tokenize=False)
    # The template's own rendering, with the end-of-answer token where it ends an assistant turn.
    assert batcher.prompt(query) == rendered.replace("a digit ", "a digit</s>")
    labels = batcher.for_training([query])["labels"][0]
    # Both replies and their terminators are labelled, nothing else (the decoder spaces words apart).
    assert batcher.tokenizer.decode(labels[labels != -100]).replace(" ", "") == "adigit</s>3</s>"


def test_a_profile_template_is_used_and_a_broken_one_is_refused(real):
    base = load_base_from_directory("hf-llava", real["llava"], prompt_template="Q: {image}{question} A:")
    assert PromptBatcher(base).prompt(Query("2+2?")) == "Q: 2+2? A:"
    with pytest.raises(ProfileError, match="base.prompt_template: .*needs a {question} field"):
        load_profile("demo", ["base.prompt_template=Q: {query} A:"])


def test_answer_length_follows_the_references_unless_the_profile_sets_it(real):
    batcher = PromptBatcher(load_base_from_directory("hf-llava", real["llava"]), max_new_tokens=None)
    long_reference = "a red double decker bus on a street"
    needed = len(batcher.tokenizer(" " + long_reference, add_special_tokens=False)["input_ids"])
    assert needed > 16  # character-level: the old fixed cap would cut it
    assert batcher.new_tokens(["vl/caption"], [[long_reference]]) == needed + 5
    assert batcher.new_tokens(["vl/digit"], [["7"]]) == len(batcher.tokenizer(" 7", add_special_tokens=False)
                                                            ["input_ids"]) + 5
    batcher.task_max_new_tokens = {"vl": 3, "vl/caption": 60}
    assert batcher.new_tokens(["vl/caption", "vl/digit"], [[long_reference], ["7"]]) == 60
    fixed = PromptBatcher(load_base_from_directory("hf-llava", real["llava"]), max_new_tokens=8)
    assert fixed.new_tokens(["vl/caption"], [[long_reference]]) == 8


# ---------------------------------------------------------------- 3. CLAP's time steps


def test_clap_gives_time_steps_not_one_pooled_vector(real):
    encoder = ClapEncoder.load(str(real["clap"]))
    rate = encoder.sample_rate
    t = np.arange(rate) / rate
    tone = (0.3 * np.sin(2 * np.pi * 440 * t)).astype(np.float32)
    early = np.concatenate([tone, np.zeros(4 * rate, np.float32)])
    late = np.concatenate([np.zeros(4 * rate, np.float32), tone])
    features = encoder([early, late])
    assert features.shape == (2, encoder.frames, encoder.feature_dim) and encoder.frames > 1
    # Where the sound is shows in which steps change: a pooled vector could not tell.
    per_step = (features[0] - features[1]).abs().mean(-1)
    assert per_step.std() > 0 and not torch.allclose(features[0, 0], features[0, -1])
    assert encoder.embedding([early]).shape == (1, 16)


def test_clap_profiles_cost_and_memory_count_its_time_steps(real):
    from safe_cli.models.memory import encoder_shape
    from safe_cli.rl.cost import AudioCostModel

    profile = load_profile("blip2-opt27b-clap")
    shape = encoder_shape(profile.audio_encoder, 1.0)
    assert (shape.frames, shape.feature_dim) == (32, 768)  # laion/clap-htsat-unfused's tower
    model = build_safe_model(load_profile("demo", ["audio_encoder.kind=clap",
                                                   f"audio_encoder.clap.name_or_path={real['clap']}"]))
    cost = AudioCostModel.for_model(model, 12)
    assert cost._frames(1.0) == model.audio_encoder.frames


# ---------------------------------------------------------------- 4. beam search and sampling keep the bypass


@pytest.fixture(scope="module")
def perturbed_llava(real):
    model = build_safe_model(load_profile("demo", ["base.kind=hf-llava", f"base.name_or_path={real['llava']}",
                                                   "audio_encoder.kind=whisper",
                                                   f"audio_encoder.whisper.name_or_path={real['whisper']}"]))
    perturb_adapters(model)
    return model


@pytest.mark.parametrize("settings", [{"num_beams": 1}, {"num_beams": 2}, {"num_beams": 4},
                                      {"num_beams": 4, "num_return_sequences": 2}])
def test_budget_zero_rows_stay_the_base_under_beam_search(perturbed_llava, settings):
    model = perturbed_llava
    batcher = PromptBatcher(model.base)
    queries = [Query("What is shown?", IMAGE), Query("Which digit?"), Query("Say it.", IMAGE), Query("Why?")]
    batch = batcher.for_generation(queries)
    audio = probe_audio(model.audio_encoder.sample_rate, 4, generator=torch.Generator().manual_seed(0))
    budgets = torch.tensor([0, 4, 0, 12])
    kwargs = dict(max_new_tokens=4, do_sample=False, pad_token_id=32001, **settings)
    reference = model.base_model.generate(**batch, **kwargs)
    fused = model.generate(**batch, token_budget=budgets, audio=audio, **kwargs)
    per = settings.get("num_return_sequences", 1)
    assert fused.shape == reference.shape == (4 * per, fused.shape[1])
    for row in (0, 2):
        for copy in range(per):
            assert torch.equal(fused[row * per + copy], reference[row * per + copy])
    everyone = model.generate(**batch, token_budget=torch.tensor([4, 4, 12, 8]), audio=audio, **kwargs)
    assert everyone.shape[0] == 4 * per  # audio on every row: used to fail with "size of tensor a (4) ... (8)"


def test_sampled_return_sequences_keep_budget_zero_rows(perturbed_llava):
    model = perturbed_llava
    batch = PromptBatcher(model.base).for_generation([Query("What is shown?", IMAGE), Query("Which digit?")])
    audio = probe_audio(model.audio_encoder.sample_rate, 2, generator=torch.Generator().manual_seed(1))
    kwargs = dict(max_new_tokens=4, do_sample=True, num_return_sequences=3, pad_token_id=32001, top_k=0)
    torch.manual_seed(0)
    reference = model.base_model.generate(**batch, **kwargs)
    torch.manual_seed(0)
    fused = model.generate(**batch, token_budget=torch.tensor([0, 8]), audio=audio, **kwargs)
    assert fused.shape[0] == 6
    assert all(torch.equal(fused[i], reference[i]) for i in range(3))


# ---------------------------------------------------------------- 5. a processor that does not match the model


def test_blip2_processor_without_query_tokens_is_refused_with_both_numbers(real):
    directory = real_checkpoints.save_blip2_opt_like(real["root"] / "blip2-old-processor",
                                                     num_query_tokens_in_processor=None)
    with pytest.raises(SafeError) as caught:
        load_base_from_directory("hf-blip2", directory)
    message = str(caught.value)
    assert "num_query_tokens = None" in message and "num_query_tokens = 32" in message
    assert "0 image tokens" in message


# ---------------------------------------------------------------- 6. YAML's booleans


@pytest.mark.parametrize("word, meant", [("off", "off"), ("false", "off"), ("no", "off"), ("on", "bf16"),
                                         ("true", "bf16"), ("bf16", "bf16")])
def test_unquoted_yaml_words_mean_the_choice(tmp_path, word, meant):
    profile = tmp_path / "p.yaml"
    profile.write_text(f"extends: demo\nname: mine\ntraining:\n  autocast: {word}\n")
    assert load_profile(str(profile)).training.autocast == meant
    assert load_profile("demo", [f"training.autocast={word}"]).training.autocast == meant


# ---------------------------------------------------------------- 7. loading and small things


def test_the_base_is_loaded_onto_its_device_shard_by_shard(real, monkeypatch):
    from transformers import LlavaForConditionalGeneration

    seen = {}
    original = LlavaForConditionalGeneration.from_pretrained.__func__

    def spy(cls, *args, **kwargs):
        seen.update(kwargs)
        return original(cls, *args, **kwargs)

    monkeypatch.setattr(LlavaForConditionalGeneration, "from_pretrained", classmethod(spy))
    base = load_base_from_directory("hf-llava", real["llava"], device="cpu")
    assert seen["device_map"] == torch.device("cpu")  # not the whole model on the host first, then .to()
    assert next(base.model.parameters()).device.type == "cpu"


def test_a_processor_that_fails_to_load_says_why(real, tmp_path):
    import shutil

    broken = tmp_path / "llava-broken-processor"
    shutil.copytree(real["llava"], broken)
    (broken / "tokenizer.json").write_text("{not json")
    with pytest.raises(SafeError, match="processor of .* does not load"):
        load_base_from_directory("hf-llava", broken)


def test_training_batches_run_the_image_processor_once(real, monkeypatch):
    batcher = PromptBatcher(load_base_from_directory("hf-llava", real["llava"]))
    calls = []
    image_processor = batcher.processor.image_processor
    original = type(image_processor).__call__
    monkeypatch.setattr(type(image_processor), "__call__",
                        lambda self, *a, **k: calls.append(1) or original(self, *a, **k))
    batcher.for_training([Query("What is shown?", IMAGE, answer="a cat"), Query("Why?", IMAGE, answer="so")])
    assert len(calls) == 1


def test_float16_base_with_bf16_autocast_keeps_the_bypass(real):
    model = build_safe_model(load_profile("demo", ["base.kind=hf-llava", f"base.name_or_path={real['llava']}",
                                                   "base.dtype=float16", "training.autocast=bf16",
                                                   "audio_encoder.kind=whisper",
                                                   f"audio_encoder.whisper.name_or_path={real['whisper']}"]))
    perturb_adapters(model)
    batch = PromptBatcher(model.base).for_generation([Query("What is shown?", IMAGE), Query("Which digit?")])
    audio = probe_audio(model.audio_encoder.sample_rate, 2, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        reference = model.base(**batch).logits
        fused = model(**batch, token_budget=torch.tensor([0, 4]), audio=audio).logits  # crashed at index_copy
    assert fused.dtype == torch.float16
    assert torch.equal(fused[0], reference[0]) and not torch.equal(fused[1], reference[1])


# ---------------------------------------------------------------- safe check shows the prompt and the end ids


@pytest.mark.parametrize("profile, key", [("llava15-7b-whisper-small", "llava"), ("blip2-opt27b-clap", "blip2")])
def test_safe_check_prints_the_prompt_and_end_of_answer_ids(real, profile, key):
    audio = (f"audio_encoder.whisper.name_or_path={real['whisper']}" if "whisper" in profile
             else f"audio_encoder.clap.name_or_path={real['clap']}")
    args = ["check", "--profile", profile, "--set", f"base.name_or_path={real[key]}", "--set", audio,
            "--set", "fusion.layers=[1,3]", "--set", "training.device=cpu", "--set", "base.dtype=float32",
            "--set", "audio_encoder.dtype=float32", "--batch-size", "4"]
    result = CliRunner().invoke(app, args, env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    if key == "llava":
        assert "llava-1.5-short" in result.output and "Answer the question using a single word" in result.output
        assert "2 ('</s>')" in result.output
    else:
        assert "blip2: 'Question: {question} Answer:'" in result.output and "50118 ('Ċ')" in result.output
    assert "bit-exact" in result.output


def test_prompt_format_describe_is_the_one_turn_prompt():
    class Tokenizer:
        image_token = "<image>"

        def decode(self, ids, skip_special_tokens=False):
            return "</s>"

    class Processor:
        tokenizer = Tokenizer()
        image_token = "<image>"

    fmt = PromptFormat.for_base("tiny-llava", Processor(), [2])
    assert fmt.describe() == "USER: <image>\n{question} ASSISTANT:"
    assert json.dumps(fmt.segments("q", (("a", "b"),), "sys", False, "c")) == json.dumps(
        [["sys ", False], ["USER: a ASSISTANT:", False], [" b</s>", True], ["USER: q ASSISTANT:", False],
         [" c</s>", True]])
