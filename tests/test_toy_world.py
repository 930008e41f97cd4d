from uae_lightning.data import toy
from uae_lightning.data.toy import Scene, ToyObject, caption, informativeness, make_scene, render

# A scene written by hand: a large red circle at the top-left and a small blue square in the centre.
SCENE = Scene((ToyObject("circle", "red", "large", 0), ToyObject("square", "blue", "small", 4)))


def test_scenes_are_a_function_of_seed_and_index():
    assert make_scene(3, 17) == make_scene(3, 17)
    assert len({make_scene(3, i) for i in range(50)}) > 40
    for i in range(200):
        s = make_scene(0, i, max_objects=3)
        assert 1 <= len(s.objects) <= 3
        assert len({o.position for o in s.objects}) == len(s.objects)


def test_render_is_deterministic_and_draws_colours_where_objects_are():
    a, b = toy.image_array(SCENE, 32), toy.image_array(SCENE, 32)
    assert (a == b).all() and a.shape == (32, 32, 3)
    top_left = a[2:9, 2:9].reshape(-1, 3).mean(0)
    centre = a[14:18, 14:18].reshape(-1, 3).mean(0)
    bottom_right = a[25:31, 25:31].reshape(-1, 3).mean(0)
    assert top_left[0] > 150 and top_left[2] < 90  # red
    assert centre[2] > 150 and centre[0] < 90  # blue
    assert (abs(bottom_right - 30) < 2).all()  # background
    assert render(SCENE, 64).size == (64, 64)


def test_caption_levels():
    assert caption(SCENE, "short") == "a circle and a square"
    assert caption(SCENE, "placed") == "a circle at the top-left and a square in the centre"
    assert caption(SCENE, "coloured") == "a red circle and a blue square"
    assert caption(SCENE, "sized") == "a large red circle and a small blue square"
    assert caption(SCENE, "complete") == "a large red circle at the top-left and a small blue square in the centre"


def test_informativeness_counts_correct_minus_wrong_facts():
    # 2 objects x 4 facts = 8 facts.
    assert informativeness(caption(SCENE, "complete"), SCENE) == 1.0
    assert informativeness(caption(SCENE, "short"), SCENE) == 2 / 8
    assert informativeness(caption(SCENE, "placed"), SCENE) == 4 / 8
    assert informativeness(caption(SCENE, "coloured"), SCENE) == 4 / 8
    assert informativeness(caption(SCENE, "sized"), SCENE) == 6 / 8
    # Order does not matter; one wrong colour costs its fact and one more: (7 - 1) / 8.
    assert informativeness("a small green square in the centre and a large red circle at the top-left", SCENE) == 6 / 8
    # A hallucinated third object: its 2 statements are wrong: (2 - 2) / 8.
    assert informativeness("a circle and a square and a yellow triangle", SCENE) == 0.0
    assert informativeness("", SCENE) == 0.0
    # Words outside the grammar are ignored, not rewarded.
    assert informativeness("describe image image . a circle", SCENE) == 1 / 8


def test_position_phrases_parse_longest_first():
    mentions = toy.parse_caption("a circle at the top-left and a square at the top")
    assert mentions == [{"shape": "circle", "position": "top-left"}, {"shape": "square", "position": "top"}]
