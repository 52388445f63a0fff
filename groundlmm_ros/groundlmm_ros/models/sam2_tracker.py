"""SAM 2's video predictor as a Tracker (engine/trackers.py), through transformers' own classes.

The model is `transformers.Sam2VideoModel` with its `Sam2VideoProcessor`, loaded from a local
Hugging Face directory (`load_sam2_video`, never downloading), or built at random from a
preset's size (`sam2_video_random`, models/presets.py TRACKERS) for benchmarks and tests. One
model serves every camera; each camera gets its own `Sam2Tracker` (one
`Sam2VideoInferenceSession`, its own objects and memory):

    model, processor = load_sam2_video(path, device="cuda")
    trackers = {camera: Sam2Tracker(model, processor) for camera in cameras}
    trackers[camera].seed(frame, masks, ids)     # the grounded masks: conditioning frame
    trackers[camera].track(frame)                # -> {id: Tracked(mask, score, lost)}
    track_batch([trackers[c] for c in ready], [frame[c] for c in ready])  # cameras together

Streaming forever, memory stays bounded: transformers' session keeps every frame's pixels,
and every frame's outputs (low- and high-resolution masks, memory features, object pointer)
per object. After each frame the tracker keeps what SAM 2 reads again: the conditioning
frames' outputs (the most recent `max_conditioning_frames` seeds) and, of the tracked frames,
the last num_maskmem - 1 frames' memory features and the last max_object_pointers_in_encoder
- 1 frames' object pointers; masks, pixels and older frames are dropped. The image features
are cached for one frame only (the session's default).

Precision: on CUDA the model and session run in bfloat16 (SAM 2's own memory features are
stored in bfloat16; bfloat16 keeps float32's range, so no overflow in the Hiera encoder);
on the CPU float32. Masks are thresholded at logit 0 at the image's size.

Batching: several cameras' frames go through the image encoder (most of the per-frame work)
in one batch (`track_batch`); the memory attention and mask decoder then run per camera and
per object, as transformers' forward runs them (it loops over objects, each with its own
memory bank), so they cannot share a batch.

score: the object-presence probability, sigmoid of SAM 2's object score logit; lost: SAM 2
says the object is not in the frame (logit <= 0) or its mask is empty.
"""

from __future__ import annotations

import torch
from transformers import (
    Sam2HieraDetConfig,
    Sam2ImageProcessor,
    Sam2VideoConfig,
    Sam2VideoModel,
    Sam2VideoProcessor,
    Sam2VideoVideoProcessor,
    Sam2VisionConfig,
)

from groundlmm_ros.engine.trackers import Tracked, TrackerMemory, check_seed

# Session outputs SAM 2 reads again on later frames; the rest of a frame's output is dropped.
KEPT_OUTPUTS = ("maskmem_features", "maskmem_pos_enc", "object_pointer", "object_score_logits")


def default_dtype(device: str) -> torch.dtype:
    return torch.bfloat16 if torch.device(device).type == "cuda" else torch.float32


def load_sam2_video(
    path: str, device: str = "cpu", dtype: torch.dtype | None = None
) -> tuple[Sam2VideoModel, Sam2VideoProcessor]:
    """A SAM 2 (2.1) video model and its processor from a local Hugging Face directory."""
    dtype = dtype or default_dtype(device)
    model = Sam2VideoModel.from_pretrained(path, dtype=dtype, local_files_only=True)
    processor = Sam2VideoProcessor.from_pretrained(path, local_files_only=True)
    return model.to(device).eval(), processor


def sam2_video_config(
    hiera: dict, image_size: int = 1024, hidden: int = 256, **video
) -> Sam2VideoConfig:
    """A Sam2VideoConfig from the Hiera encoder's settings (Sam2HieraDetConfig fields); the
    FPN reads the encoder's stages in reverse, at strides 4, 8, 16 (and 32, unused)."""
    backbone = Sam2HieraDetConfig(image_size=[image_size, image_size], **hiera)
    sides = [image_size // 4, image_size // 8, image_size // 16]
    vision = Sam2VisionConfig(
        backbone_config=backbone,
        backbone_channel_list=list(reversed(backbone.embed_dim_per_stage)),
        backbone_feature_sizes=[[s, s] for s in sides],
        fpn_hidden_size=hidden,
    )
    return Sam2VideoConfig(
        vision_config=vision,
        prompt_encoder_config={"hidden_size": hidden, "image_size": image_size},
        mask_decoder_config={"hidden_size": hidden},
        image_size=image_size,
        memory_attention_hidden_size=hidden,
        memory_encoder_hidden_size=hidden,
        memory_fuser_embed_dim=hidden,
        mask_downsampler_embed_dim=hidden,
        memory_attention_rope_feat_sizes=[sides[-1], sides[-1]],
        **video,
    )


def sam2_video_processor(image_size: int = 1024) -> Sam2VideoProcessor:
    """transformers' processor for a model of this input side (the released ones: 1024)."""
    size = {"height": image_size, "width": image_size}
    mask = {"height": image_size // 4, "width": image_size // 4}
    return Sam2VideoProcessor(
        Sam2ImageProcessor(size=size, mask_size=mask), Sam2VideoVideoProcessor(size=size)
    )


def sam2_video_random(
    config: Sam2VideoConfig, device: str = "cpu", dtype: torch.dtype | None = None, seed: int = 0
) -> tuple[Sam2VideoModel, Sam2VideoProcessor]:
    """A model of this config with random weights (benchmarks at the released sizes, tests)."""
    torch.manual_seed(seed)
    model = Sam2VideoModel(config).to(device, dtype or default_dtype(device)).eval()
    return model, sam2_video_processor(config.image_size)


class Sam2Tracker:
    """One camera's SAM 2 session (see the module docstring). max_conditioning_frames: how
    many seeds per object SAM 2 keeps attending to (the most recent ones)."""

    def __init__(
        self, model: Sam2VideoModel, processor: Sam2VideoProcessor, max_conditioning_frames: int = 4
    ):
        if max_conditioning_frames < 1:
            raise ValueError(f"max_conditioning_frames must be >= 1, got {max_conditioning_frames}")
        self.model, self.processor = model, processor
        self.max_conditioning_frames = max_conditioning_frames
        self.device = model.device
        self.session = processor.init_video_session(inference_device=self.device, dtype=model.dtype)
        self.ids: list[int] = []
        self.size: tuple[int, int] | None = None
        self.frame_index = 0
        config = model.config
        # How far back SAM 2 looks at tracked frames: memories, and (further) object pointers.
        self.memory_window = config.num_maskmem - 1
        self.pointer_window = max(config.num_maskmem, config.max_object_pointers_in_encoder) - 1

    def pixels(self, frames: list) -> torch.Tensor:
        """(B, 3, S, S) the processor's input for these frames, on the model's device."""
        inputs = self.processor(images=frames, device=self.device, return_tensors="pt")
        return inputs.pixel_values.to(self.device, self.model.dtype)

    @torch.inference_mode()
    def seed(self, frame, masks, ids):
        check_seed(frame, masks, ids)
        if any(i not in ids for i in self.ids) or frame.shape[:2] != self.size:
            # transformers' session cannot drop an object: start afresh without it.
            self.session.reset_inference_session()
            self.ids = []
        self.size = frame.shape[:2]
        if not ids:
            return
        self.session.video_height, self.session.video_width = self.size
        self.ids = self.ids + [i for i in ids if i not in self.ids]
        self.processor.add_inputs_to_inference_session(
            self.session,
            frame_idx=self.frame_index,
            obj_ids=list(ids),
            input_masks=[torch.from_numpy(m) for m in masks],
        )
        self._step(self.pixels([frame])[0], None)

    @torch.inference_mode()
    def track(self, frame):
        if self.size is None:
            raise ValueError("Sam2Tracker.track needs a seed first")
        if frame.shape[:2] != self.size:
            raise ValueError(f"frame {frame.shape[:2]} is not at the seeded size {self.size}")
        if not self.ids:
            return {}
        return self._step(self.pixels([frame])[0], None)

    def _step(self, pixels: torch.Tensor, features: dict | None) -> dict[int, Tracked]:
        """One frame through the session (features: its image features when batched)."""
        index = self.frame_index
        self.frame_index += 1
        if features is not None:
            self.session.cache.cache_vision_features(index, features)
        output = self.model(inference_session=self.session, frame_idx=index, frame=pixels)
        self._prune(index)
        logits = self.processor.post_process_masks(
            [output.pred_masks.float()], original_sizes=[list(self.size)], binarize=False
        )[0][:, 0]
        masks = (logits > 0).cpu().numpy()
        presence = output.object_score_logits.float().reshape(-1).cpu()
        results = {}
        for obj_id, mask, logit in zip(output.object_ids, masks, presence.tolist()):
            # SAM 2 has already cleared the mask of an object it says is absent (logit <= 0).
            score = float(torch.sigmoid(torch.tensor(logit)))
            results[obj_id] = Tracked(mask, score, logit <= 0 or not mask.any())
        return results

    def _prune(self, index: int) -> None:
        """Keep what SAM 2 reads again (module docstring); drop the rest of the session."""
        session = self.session
        session.processed_frames = {}
        for obj_idx, outputs in session.output_dict_per_obj.items():
            conditioning = outputs["cond_frame_outputs"]
            for old in sorted(conditioning)[: -self.max_conditioning_frames]:
                del conditioning[old]
            tracked = outputs["non_cond_frame_outputs"]
            for frame in list(tracked):
                if frame <= index - self.pointer_window:
                    del tracked[frame]
                elif frame <= index - self.memory_window:
                    tracked[frame] = {"object_pointer": tracked[frame]["object_pointer"]}
            for kept in list(conditioning.values()) + list(tracked.values()):
                for key in [k for k in kept if k not in KEPT_OUTPUTS]:
                    del kept[key]
            session.frames_tracked_per_obj[obj_idx] = {}
            session.point_inputs_per_obj[obj_idx] = {}
            session.mask_inputs_per_obj[obj_idx] = {}

    def memory(self) -> TrackerMemory:
        """Frames whose outputs (or pixels, or image features) the session holds, and the
        bytes of every tensor in it."""
        session, frames, tensors = self.session, set(), []
        frames |= set(session.processed_frames or {}) | set(session.cache._vision_features)
        for outputs in session.output_dict_per_obj.values():
            for kind in outputs.values():
                frames |= set(kind)
                tensors += [v for out in kind.values() for v in out.values()]
        tensors += list((session.processed_frames or {}).values())
        for cached in session.cache._vision_features.values():
            for value in cached.values():
                tensors += value if isinstance(value, list) else [value]
        size = sum(t.numel() * t.element_size() for t in tensors if isinstance(t, torch.Tensor))
        return TrackerMemory(len(frames), size)


@torch.inference_mode()
def track_batch(trackers: list[Sam2Tracker], frames: list) -> list[dict[int, Tracked]]:
    """One frame per tracker (cameras sharing one model): one image-encoder batch for all the
    frames, then each tracker's memory attention and decoder. -> each tracker's track()."""
    if not trackers:
        return []
    if len({id(t.model) for t in trackers}) != 1:
        raise ValueError("track_batch needs trackers of one model")
    for tracker, frame in zip(trackers, frames):
        if tracker.size is None or frame.shape[:2] != tracker.size:
            raise ValueError("every tracker needs a seed and a frame at its seeded size")
    busy = [i for i, tracker in enumerate(trackers) if tracker.ids]
    results: list[dict[int, Tracked]] = [{} for _ in trackers]
    if not busy:
        return results
    pixels = trackers[busy[0]].pixels([frames[i] for i in busy])
    encoded = trackers[busy[0]].model.get_image_features(pixels, return_dict=True)
    for b, i in enumerate(busy):
        features = {
            "vision_feats": [f[:, b : b + 1] for f in encoded.fpn_hidden_states],
            "vision_pos_embeds": [p[:, b : b + 1] for p in encoded.fpn_position_encoding],
        }
        results[i] = trackers[i]._step(pixels[b], features)
    return results
