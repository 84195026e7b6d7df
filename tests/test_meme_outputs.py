"""Meme-ready outputs: GIF, WebP, WebM, stickers, --max-kb, captions and loops.

End to end with the tiny weights at 128 pixels: one clip per output, made once per module (the
library with one loaded pipeline; the command line once, for its result line); the writers
themselves on synthetic frames, where no model is needed.
"""

from __future__ import annotations

import re
import subprocess
import sys
from fractions import Fraction
from pathlib import Path

import cv2
import numpy as np
import pytest
from typer.testing import CliRunner

import hellomeme_cli as hm
from conftest import MEDIA, require
from hellomeme_cli.cli import _crossfade_joined, app
from hellomeme_cli.errors import HellomemeError
from hellomeme_cli.face.driving import _timing
from hellomeme_cli.media.captions import MAX_BAND, Captions, _runs, _fonts, default_fonts
from hellomeme_cli.media.formats import STICKERS, output_plan
from hellomeme_cli.media.meme import write_clip
from hellomeme_cli.media.video import ffmpeg_exe, probe_video, read_frames, write_video
from hellomeme_cli.settings import from_values
from hellomeme_cli.weights.cache import WeightCache

FAST = {"size": 128, "steps": 2, "seed": 3}
MADE = 6  # frames each clip is made of
runner = CliRunner()


def frames_of(path: Path) -> np.ndarray:
    return np.stack(list(read_frames(path))).astype(int)


def streams(path: Path) -> dict[str, str]:
    """{"Video": codec, "Audio": codec} as ffmpeg reads the file."""
    text = subprocess.run([ffmpeg_exe(), "-hide_banner", "-i", str(path)], capture_output=True, text=True).stderr
    return {kind: codec for kind, codec in re.findall(r"Stream #0:\d+\S*: (Video|Audio): (\w+)", text)}


def loops_forever(path: Path) -> bool:
    """GIF: the NETSCAPE2.0 extension with a loop count of 0; WebP: the ANIM chunk's loop count 0."""
    data = path.read_bytes()
    if path.suffix == ".gif":
        return b"NETSCAPE2.0\x03\x01\x00\x00" in data
    anim = data.index(b"ANIM")
    return data[anim + 12: anim + 14] == b"\x00\x00"


@pytest.fixture(scope="module")
def made(tiny_cache, tmp_path_factory) -> dict:
    """Each output made once: a captioned pingpong GIF fitted to 64 KB (the command line), a WebP and
    a crossfaded WebM with the clip's audio (the library), a Telegram sticker from a 60 fps clip."""
    folder = tmp_path_factory.mktemp("meme")
    reference, clip = require(MEDIA / "majicmix1.jpg", "portrait"), require(MEDIA / "qie.mp4", "clip with audio")
    with pytest.MonkeyPatch.context() as env:
        env.setenv("HELLOMEME_HOME", str(tiny_cache))
        gif = folder / "meme.gif"
        command = ["animate", str(reference), str(clip), "--size", "128", "--steps", "2", "--seed", "3", "--max-frames", str(MADE)]
        command += ["--caption", "TOP TEXT", "--caption-bottom", "BOTTOM TEXT", "--loop", "pingpong", "--max-kb", "64", "-o", str(gif)]
        line = runner.invoke(app, command)
        assert line.exit_code == 0, line.output
        pipe = hm.load_pipeline(cache=WeightCache(tiny_cache), device="cpu")
        common = {**FAST, "max_frames": MADE}
        webp = hm.animate(pipe, reference, clip, folder / "meme.webp", quality=60, **common)
        webm = hm.animate(pipe, reference, clip, folder / "meme.webm", loop="crossfade:2", **common)
        fast_clip = folder / "sixty.mp4"  # 12 frames at 60 fps with qie's sound: a sticker is made at 30
        write_video(read_frames(clip, 12), fast_clip, 60, audio_from=probe_video(clip))
        sticker = hm.animate(pipe, reference, fast_clip, folder / "sticker.webm", sticker="telegram", **{**FAST})
        picture_reference = folder / "portrait.webp"  # the picture command takes WebP and GIF pictures
        cv2.imwrite(str(picture_reference), cv2.imread(str(reference)))
        drive_gif = folder / "drive.gif"
        cv2.imwrite(str(drive_gif), cv2.imread(str(require(MEDIA / "chillout.jpg", "portrait"))))
        hm.render_image(pipe, picture_reference, drive_gif, folder / "picture.webp", caption="HELLO", **FAST)
    return {"gif": gif, "line": line.output, "webp": webp, "webm": webm, "sticker": sticker, "picture": folder / "picture.webp", "clip": clip}


def test_each_format_is_what_its_suffix_says_and_says_what_became_of_the_audio(made):
    source = probe_video(made["clip"])
    expected = {"gif": ("gif", 2 * MADE - 2), "webp": ("webp_anim", MADE), "webm": ("vp9", MADE - 2)}
    for name, (codec, frames) in expected.items():
        path = made["gif"] if name == "gif" else made[name].output
        info = probe_video(path)
        assert streams(path)["Video"] == codec and info.frame_count == frames, name
        assert abs(info.fps - source.fps) <= 0.01 * source.fps, (name, info.rate)  # within GIF's 1/100 s, WebP's and WebM's 1/1000 s
        assert len(list(read_frames(path))) == frames  # eval reads them as it reads an mp4
        assert info.tags["hellomeme_seed"] == "3", name  # GIF comment, WebP XMP chunk, Matroska tags
        if name != "webm":
            assert loops_forever(path) and not info.has_audio
    assert "audio left out (GIF has no sound)" in made["line"] and "GIF, 10 frames at 15 fps (delays of 6 and 7 hundredths" in made["line"]
    assert made["webp"].audio == "left out (animated WebP has no sound)" and made["webp"].format == "webp"
    webm = probe_video(made["webm"].output)
    assert streams(made["webm"].output)["Audio"] == "opus" and made["webm"].audio == "kept"
    assert abs(_sound_seconds(made["webm"].output) - webm.duration) < 0.05  # crossfaded as the frames are: shorter by 2 frames


def _sound_seconds(path: Path) -> float:
    samples = subprocess.run([ffmpeg_exe(), "-v", "error", "-i", str(path), "-f", "s16le", "-ac", "1", "-ar", "8000", "-"], capture_output=True).stdout
    return len(samples) / 2 / 8000


def test_max_kb_output_fits_and_each_try_is_said(made):
    assert made["gif"].stat().st_size <= 64 * 1024
    assert re.search(r"fitted in 64 KB after \d+ tries: \d+ colours", made["line"]) or "within 64 KB" in made["line"]


def test_an_impossible_size_target_is_one_line_with_the_smallest_size_reached(tmp_path):
    events = []
    plan = output_plan(tmp_path / "tiny.webp", max_kb=1)
    with pytest.raises(HellomemeError) as error:
        write_clip(_noise(12), tmp_path / "tiny.webp", 12, plan, progress=events.append)
    message = str(error.value)
    assert "\n" not in message and re.search(r"cannot fit in 1 KB: the smallest of (\d+) tries was \d+ KB \(quality 5, 32x32, 6 fps\)", message)
    tries = [event for event in events if event.task == "fitting in 1 KB"]
    assert len(tries) == int(re.search(r"smallest of (\d+) tries", message)[1]) and all("too big" in event.detail for event in tries)
    assert not (tmp_path / "tiny.webp").exists()


def _noise(count: int, size: int = 64) -> list[np.ndarray]:
    generator = np.random.default_rng(0)
    return [generator.integers(0, 256, (size, size, 3), dtype=np.uint8) for _ in range(count)]


def test_telegram_sticker_meets_every_limit(made):
    sticker, limits = made["sticker"], STICKERS["telegram"]
    info = probe_video(sticker.output)
    assert streams(sticker.output) == {"Video": "vp9"} and sticker.output.suffix == ".webm"  # VP9, no audio stream
    assert max(info.width, info.height) == limits.side == 512 and min(info.width, info.height) <= 512
    assert info.fps <= 30 and info.duration <= 3 and sticker.output.stat().st_size <= 256 * 1024
    assert info.frame_count == 6  # 12 frames at 60 fps, made at 30: nothing of the clip's time lost
    assert "audio left out (telegram stickers have none)" in sticker.description
    assert "made at 30 fps rather than 60 (telegram stickers: at most 30 fps)" in sticker.description


def test_a_clip_longer_than_a_sticker_is_cut_to_its_first_seconds_and_says_so():
    stamps = np.arange(150) / 30  # 5 s at 30 fps
    timing = _timing(stamps, 5.0, Fraction(30), False, None, Fraction(30), 3.0)
    assert len(timing.shown) == 90 and timing.shown[-1] == 89 and timing.cut_seconds == pytest.approx(2.0)
    fast = _timing(np.arange(120) / 60, 2.0, Fraction(60), False, None, Fraction(30), 3.0)
    assert fast.rate == 30 and fast.capped == 60 and len(fast.shown) == 60 and fast.cut_seconds == 0


def test_pingpong_frames_read_the_same_forwards_and_backwards(made):
    frames = frames_of(made["gif"])
    count = len(frames)
    assert count == 2 * MADE - 2
    for index in range(count):
        assert np.abs(frames[index] - frames[(count - index) % count]).mean() < 1, index
    assert np.abs(frames[MADE - 1] - frames[MADE]).mean() > 1  # the turning frame is not doubled


def test_crossfade_blends_the_last_frames_into_the_first(tmp_path):
    values = [20 * index for index in range(10)]
    frames = [np.full((32, 32, 3), value, np.uint8) for value in values]
    path = tmp_path / "fade.mp4"
    written = write_clip(frames, path, 10, output_plan(path, loop="crossfade:3"))
    shown = frames_of(path).mean(axis=(1, 2, 3))
    weights = np.array([1, 2, 3]) / 4
    expected = [*(weights * values[:3] + (1 - weights) * values[7:]), *values[3:7]]
    assert written.frames == 7 and np.allclose(shown, expected, atol=2.5), shown


def test_a_caption_changes_its_band_on_every_frame_and_nothing_else(tmp_path):
    ramp = np.linspace(0, 255, 256)
    frames = [np.dstack([np.tile(np.roll(ramp, 8 * i), (256, 1)), np.tile(ramp[:, None], (1, 256)), np.full((256, 256), 90)]).astype(np.uint8) for i in range(6)]
    plain, captioned = tmp_path / "plain.webp", tmp_path / "captioned.webp"
    write_clip(frames, plain, 10, output_plan(plain, quality=100))
    captions = Captions("TOP TEXT")
    write_clip(frames, captioned, 10, output_plan(captioned, quality=100), captions=captions)
    top, bottom = captions.band(256, 256)
    assert 0 < top < bottom <= 256 * MAX_BAND
    for frame in frames:  # as drawn: not one pixel outside the band
        drawn = captions.apply(frame)
        assert np.array_equal(drawn[:top], frame[:top]) and np.array_equal(drawn[bottom:], frame[bottom:])
    difference = np.abs(frames_of(plain) - frames_of(captioned)).mean(axis=3)
    for frame in difference:  # as encoded
        assert frame[top:bottom].mean() > 20  # the white letters and their outline
        assert frame[bottom + 8:].mean() < 1 and frame[bottom + 8:].max() <= 6  # the codec's rounding beyond a margin


def test_a_40_character_line_fits_at_512_pixels():
    text = "WHEN THE TINY WEIGHTS FINALLY MAKE MEMES"
    assert len(text) == 40
    layer = Captions(text).layer(512, 512)
    drawn = np.flatnonzero(layer[..., 3].any(axis=0))
    rows = np.flatnonzero(layer[..., 3].any(axis=1))
    assert drawn[0] >= 512 * 0.02 and drawn[-1] <= 512 * 0.98  # within the side margins
    assert 40 <= rows[-1] - rows[0] <= 512 * MAX_BAND  # legible letters, at most the band


def test_characters_the_fonts_lack_are_refused_in_one_line_or_drawn_by_the_fallback():
    with pytest.raises(HellomemeError) as error:
        from_values({"caption": "NIHAO 你好"})
    assert "\n" not in str(error.value) and "no glyph for 你 (U+4F60) 好 (U+597D)" in str(error.value) and "--caption-font" in str(error.value)
    anton, dejavu = default_fonts()
    fonts = _fonts((anton, dejavu), 40)
    assert [font.path for _, font in _runs("ЖИЗНЬ OK", fonts)] == [str(dejavu), str(anton)]  # Cyrillic from DejaVu Sans Bold
    from_values({"caption": "ЖИЗНЬ"})  # so it is accepted
    assert Captions("Ж").layer(64, 64)[..., 3].any()


def test_image_takes_webp_and_gif_pictures_and_draws_the_caption(made):
    picture = cv2.cvtColor(cv2.imread(str(made["picture"])), cv2.COLOR_BGR2RGB)
    assert picture.shape == (128, 128, 3)
    top = Captions("HELLO").band(128, 128)
    assert (picture[top[0]:top[1]] > 240).all(axis=2).any()  # white letters in the band


def test_bad_values_are_one_line_and_exit_1_before_any_model_loads(tmp_path):
    """Each refused by the settings or the output checks; no heavy library imported by any of them."""
    (tmp_path / "ref.jpg").write_bytes(b"x")
    (tmp_path / "clip.mp4").write_bytes(b"x")
    cases = {
        ("--max-kb", "0"): "--max-kb must be at least 1 (got 0)",
        ("--sticker", "icq"): "--sticker must be one of telegram, whatsapp (got 'icq')",
        ("--caption", ""): "--caption is empty",
        ("-o", "x.bmp"): "x.bmp: clips are written as .mp4, .m4v, .mov, .gif, .webp, .webm, not .bmp",
        ("--sticker", "telegram", "-o", "x.gif"): "x.gif: telegram stickers are VP9 WebM (.webm), not .gif",
        ("--loop", "spin"): "--loop must be off, pingpong or crossfade:N (got 'spin')",
        ("--quality", "50", "-o", "x.gif"): "--quality applies to .webp and .webm outputs",
    }
    script = (
        "import sys\nfrom hellomeme_cli.cli import main\nfor case in sys.argv[1:]:\n"
        "    sys.argv = ['hellomeme', 'animate', 'ref.jpg', 'clip.mp4', *case.split('|')]\n"
        "    try:\n        main()\n    except SystemExit as exit_:\n        print('exit', exit_.code, file=sys.stderr)\n"
        "print(*sorted(name for name in ('torch', 'diffusers', 'transformers', 'mediapipe', 'cv2') if name in sys.modules))"
    )
    result = subprocess.run([sys.executable, "-c", script, *("|".join(case) for case in cases)], capture_output=True, text=True, cwd=tmp_path)
    answers = re.findall(r"error: (.*)\nexit (\d+)", result.stderr)
    assert len(answers) == len(cases), result.stderr
    for (message, code), expected in zip(answers, cases.values()):
        assert code == "1" and expected in message, (message, expected)
    assert result.stdout.strip() == "", f"imported before the checks: {result.stdout}"


def test_loop_crossfade_n_reads_as_one_value():
    assert _crossfade_joined(["animate", "a", "b", "--loop", "crossfade", "6", "--steps", "2"]) == ["animate", "a", "b", "--loop", "crossfade:6", "--steps", "2"]
    assert from_values({"loop": "crossfade"}).loop == "crossfade:8" and from_values({"loop": "crossfade 4"}).loop == "crossfade:4"


def test_batch_rows_take_the_format_and_name_outputs_after_it(tmp_path):
    from hellomeme_cli.batch.jobs import plan_pairs

    table = tmp_path / "jobs.csv"
    table.write_text("reference,driving,format,sticker,caption,loop\nr.jpg,a.mp4,gif,,HI,pingpong\nr.jpg,b.mp4,,telegram,,\nr.jpg,c.mp4,,,,\n")
    plan = plan_pairs(table, from_values({}))
    assert [job.output.name for job in plan.jobs] == ["r_a.gif", "r_b.webm", "r_c.mp4"]
    assert (plan.jobs[0].settings.caption, plan.jobs[0].settings.loop, plan.jobs[1].settings.sticker) == ("HI", "pingpong", "telegram")
    table.write_text("reference,driving,output,sticker\nr.jpg,a.mp4,a.gif,telegram\n")
    with pytest.raises(HellomemeError, match=r"jobs.csv:2: .*a.gif: telegram stickers are VP9 WebM \(.webm\), not .gif"):
        plan_pairs(table, from_values({}))


def test_eval_scores_a_gif_as_it_scores_an_mp4(made, tiny_cache):
    """A pingpong GIF: the way back is scored against the clip read backwards."""
    evaluation = hm.evaluate(made["gif"], made["clip"], MEDIA / "majicmix1.jpg", cache=WeightCache(tiny_cache))
    assert evaluation.summary["frames"] == 2 * MADE - 2 and evaluation.summary["audio"] is False
    assert abs(evaluation.summary["fps"] - probe_video(made["clip"]).fps) < 0.01


def test_whatsapp_sticker_is_a_512_square_webp_with_a_transparent_border(tmp_path):
    from PIL import Image

    frames = [np.full((96, 64, 3), 40 * index, np.uint8) for index in range(4)]  # a portrait picture, not square
    path = tmp_path / "sticker.webp"
    written = write_clip(frames, path, 10, output_plan(path, sticker="whatsapp"), audio=None)
    assert (written.width, written.height) == (512, 512) and path.stat().st_size <= 500 * 1024
    with Image.open(path) as sticker:
        assert sticker.size == (512, 512) and sticker.n_frames == 4
        pixels = np.asarray(sticker.convert("RGBA"))
    assert pixels[256, 0, 3] == 0 and pixels[256, 256, 3] == 255  # padded left and right, the picture opaque
