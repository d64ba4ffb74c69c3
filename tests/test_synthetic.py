import numpy as np

from blossom.data import synthetic


def test_same_seed_and_index_give_identical_images_and_captions():
    a_img, a_flower, a_text = synthetic.generate(3, 17, 64)
    b_img, b_flower, b_text = synthetic.generate(3, 17, 64)
    assert np.array_equal(np.asarray(a_img), np.asarray(b_img))
    assert (a_flower, a_text) == (b_flower, b_text)
    c_img, _, _ = synthetic.generate(4, 17, 64)
    assert not np.array_equal(np.asarray(a_img), np.asarray(c_img))


def test_every_caption_states_every_scored_attribute():
    # docs/quality.md: naming count and shape in every caption is what taught the model to draw them
    for i in range(300):
        _, f, text = synthetic.generate(0, i, 32)
        words = text.lower().replace(",", "").split()
        assert any(w in text for w in synthetic.COLOR_WORDS[f.petal_color]), text
        assert any(p in text.lower() for p in synthetic.BACKGROUND_PHRASES[f.background]), text
        assert synthetic.NUMBER_WORDS[f.petal_count] in words or str(f.petal_count) in words, text
        assert set(synthetic.SHAPE_WORDS[f.petal_shape]) & set(words), text


def test_background_dropout_leaves_only_the_background_out_of_its_share_of_captions():
    # docs/quality.md: a tenth of captions without their background lifted held-out colour on three seeds
    changed = 0
    for i in range(600):
        img, f, full = synthetic.generate(0, i, 16)
        img_d, f_d, text = synthetic.generate(0, i, 16, background_dropout=0.25)
        assert f_d == f and img_d.tobytes() == img.tobytes()  # the same flower, drawn the same
        if text == full:
            continue
        changed += 1
        # the full caption with its background phrase cut out, with the separator that joined it
        cuts = set()
        for phrase in synthetic.BACKGROUND_PHRASES[f.background]:
            cuts |= {full.replace(", " + phrase, ""), full.replace(" " + phrase, "")}
            cuts.add(full.replace(phrase[0].upper() + phrase[1:] + ", ", ""))
        assert text in cuts - {full}, (full, text)
        assert not text[0].isupper() and not text.endswith((",", " ")) and " ," not in text, text
    assert 0.19 < changed / 600 < 0.31


def test_attributes_cover_the_palette_and_held_out_pairs_stay_out_of_training():
    flowers = [synthetic.generate(0, i, 16)[1] for i in range(600)]
    assert {f.petal_color for f in flowers} == set(synthetic.PETAL_COLORS)
    assert {f.background for f in flowers} == set(synthetic.BACKGROUNDS)
    assert {f.petal_count for f in flowers} == set(synthetic.PETAL_COUNTS)
    assert not {(f.petal_color, f.background) for f in flowers} & set(synthetic.HELD_OUT)
    held = [synthetic.generate(0, i, 16, held_out="only")[1] for i in range(50)]
    assert all((f.petal_color, f.background) in synthetic.HELD_OUT for f in held)


def test_petal_colour_dominates_the_flower_region():
    # The drawn petals really have the named colour: in the ring between the centre disc and
    # the petal tips, more pixels lie near the named colour than near any other palette colour
    # (40 is about half the distance, 77, between the closest palette pair, orange and yellow).
    for i in range(40):
        img, f, _ = synthetic.generate(1, i, 64)
        arr = np.asarray(img).astype(float)
        r = {"small": 0.28, "medium": 0.36, "large": 0.44}[f.size] * 64
        yy, xx = np.mgrid[:64, :64]
        d = np.hypot(xx + 0.5 - f.cx * 64, yy + 0.5 - f.cy * 64)
        ring = arr[(d > 0.3 * r) & (d < 0.45 * r)]
        near = {
            k: int((np.linalg.norm(ring - np.array(v), axis=1) < 40).sum()) for k, v in synthetic.PETAL_COLORS.items()
        }
        nearest = max(near, key=near.get)
        assert nearest == f.petal_color, (i, f)


def test_the_data_set_is_the_same_bytes_on_one_process_or_several(tmp_path):
    # issue 15: drawing on every core must not change what the cache and training see
    import hashlib

    from blossom.config import DataConfig
    from blossom.data.folder import write_synthetic

    def digest(workers: int) -> str:
        out = tmp_path / f"w{workers}"
        write_synthetic(DataConfig(image_size=32, train_size=600, val_size=40, workers=workers), out)
        h = hashlib.sha256()
        for p in sorted(out.rglob("*")):
            if p.is_file():
                h.update(p.relative_to(out).as_posix().encode() + p.read_bytes())
        return h.hexdigest()

    assert digest(1) == digest(3)
    assert sum(1 for _ in (tmp_path / "w3" / "train").glob("*.png")) == 600
