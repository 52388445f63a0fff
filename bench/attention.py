"""Attention recorder cost on CPU: a medium random LLaVA (1024 hidden, 8 layers, 576 image tokens)
generating 64 tokens three ways:

  plain     transformers' generate() on SDPA, no recorder (what the model costs anyway)
  recorder  the engine's decoder (models/decoder.py), the recorder on (what the engine runs)
  eager     generate() on eager attention with output_attentions=True (the reference's way)

Runs are interleaved and repeated; times are medians. The machine is shared, so wall-clock times
swing by 2x with other people's load: time_ratio uses this process's CPU time
(time.process_time, all its threads), which measures the work done; the wall-clock
ratio is printed beside it. The LAST line is JSON:
{"time_ratio": recorder/plain, "memory_ratio": eager_attention_bytes/recorder_bytes, ...};
recorder_bytes is the decoder's whole map buffer (its bucket's rows x cache length).
Targets: time_ratio <= 1.05, memory_ratio >= 100.

    .venv/bin/python bench/attention.py [--repeats 5] [--threads 1]
"""

import argparse
import json
import statistics
import time

import numpy as np
import torch
from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

from groundlmm_ros.models.llava import llava_backend
from groundlmm_ros.models.tiny import tiny_tokenizer


def medium_llava(vocab_size: int) -> LlavaForConditionalGeneration:
    """Vicuna-7B proportions at 1/4 width and 1/4 depth (MHA, 2.69x MLP, 32k vocabulary);
    a one-layer CLIP at 336 px / patch 14 gives the 24 x 24 = 576 visual tokens."""
    config = LlavaConfig(
        vision_config=CLIPVisionConfig(
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=2,
            num_attention_heads=2,
            image_size=336,
            patch_size=14,
            projection_dim=64,
        ),
        text_config=LlamaConfig(
            vocab_size=vocab_size,
            hidden_size=1024,
            intermediate_size=2752,
            num_hidden_layers=8,
            num_attention_heads=16,
            num_key_value_heads=16,
            max_position_embeddings=2048,
            bos_token_id=1,
            eos_token_id=2,
            pad_token_id=3,
        ),
        image_token_id=0,
    )
    torch.manual_seed(0)
    return LlavaForConditionalGeneration(config).eval()


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--new-tokens", type=int, default=64)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    tokenizer = tiny_tokenizer()
    backend = llava_backend(medium_llava(32000), tokenizer)  # text model on the recording SDPA
    eager = medium_llava(32000)
    eager.set_attn_implementation("eager")
    image = np.random.RandomState(0).randint(0, 256, (480, 640, 3), dtype=np.uint8)
    question = "Describe the image in detail."
    visual = backend.encode(image)
    prompt = backend.prompts.prompt(visual, question)
    settings = dict(
        inputs_embeds=prompt.embeds,
        max_new_tokens=args.new_tokens,
        min_new_tokens=args.new_tokens,
        do_sample=False,
    )

    def plain():
        return backend.lm.generate(**settings)

    def recorded():
        return backend.generate(visual, question, args.new_tokens, stop_at_end=False)

    def reference():
        return eager.generate(**settings, output_attentions=True, return_dict_in_generate=True)

    runs = {"plain": plain, "recorder": recorded, "eager": reference}
    wall = {name: [] for name in runs}
    cpu = {name: [] for name in runs}
    results = {}
    with torch.inference_mode():
        for _ in range(args.repeats):
            for name, run in runs.items():
                start_wall, start_cpu = time.perf_counter(), time.process_time()
                results[name] = run()
                wall[name].append(time.perf_counter() - start_wall)
                cpu[name].append(time.process_time() - start_cpu)

    ids, maps = results["recorder"]
    (buffers,) = backend.decoder.buffers.values()
    recorder_bytes = buffers.record.nbytes
    out = results["eager"]
    eager_bytes = sum(
        layer.numel() * layer.element_size() for step in out.attentions for layer in step
    )
    start, n_image = prompt.image_start, prompt.n_image
    # The reference's reduction: per step, the newest row's image columns, mean over layers and
    # heads.
    reference_maps = torch.stack(
        [
            torch.stack([layer[0, :, -1, start : start + n_image] for layer in step]).mean(
                dim=(0, 1)
            )
            for step in out.attentions
        ]
    )
    max_diff = float((maps - reference_maps).abs().max())
    cpu_median = {name: statistics.median(values) for name, values in cpu.items()}
    wall_median = {name: statistics.median(values) for name, values in wall.items()}

    print(
        f"prompt {prompt.embeds.shape[1]} tokens ({n_image} visual), {args.new_tokens} new tokens, "
        f"{args.threads} thread(s), {args.repeats} interleaved repeats, medians:"
    )
    print(
        f"{'method':<12} {'CPU s':>7} {'/plain':>7} {'wall s':>7} {'wall min':>8} {'wall max':>8} "
        f"{'attention kept':>16}"
    )
    kept = {"plain": 0, "recorder": recorder_bytes, "eager": eager_bytes}
    for name in runs:
        print(
            f"{name:<12} {cpu_median[name]:>7.3f} {cpu_median[name] / cpu_median['plain']:>7.3f} "
            f"{wall_median[name]:>7.3f} {min(wall[name]):>8.3f} {max(wall[name]):>8.3f} "
            f"{kept[name]:>14,d} B"
        )
    summary = {
        "time_ratio": round(cpu_median["recorder"] / cpu_median["plain"], 4),
        "memory_ratio": round(eager_bytes / recorder_bytes, 1),
        "wall_time_ratio": round(wall_median["recorder"] / wall_median["plain"], 4),
        "plain_cpu_s": round(cpu_median["plain"], 3),
        "recorder_cpu_s": round(cpu_median["recorder"], 3),
        "eager_cpu_s": round(cpu_median["eager"], 3),
        "eager_attention_bytes": eager_bytes,
        "recorder_bytes": recorder_bytes,
        "maps_max_abs_diff": max_diff,
        "same_tokens": ids == out.sequences[0].tolist(),
        "repeats": args.repeats,
        "threads": args.threads,
    }
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
