"""Video io: exact probing and decoding of real and synthetic clips, atomic and exact writing."""

from __future__ import annotations

import os
import stat
import subprocess
from fractions import Fraction
from pathlib import Path

import cv2
import numpy as np
import pytest

from conftest import SHARED, audio_duration, require
from hellomeme_cli.media import video
from hellomeme_cli.errors import HellomemeError

MEDIA = SHARED / "media"
REAL_CLIPS = {"jue.mp4": 84, "nice.mp4": 71, "qie.mp4": 38, "ysll.mp4": 61, "tndtc.mp4": 34}


def ffmpeg(*args: str, stdin: bytes | None = None) -> None:
    subprocess.run([video.ffmpeg_exe(), "-y", "-v", "error", *args], input=stdin, check=True)


def synthetic_clip(path: Path, rate: str, frames: int, size: str = "160x120") -> Path:
    ffmpeg("-f", "lavfi", "-i", f"testsrc2=size={size}:rate={rate}", "-frames:v", str(frames), "-c:v", "libx264", "-pix_fmt", "yuv420p", str(path))
    return path


def flat_frames(count: int, height: int, width: int) -> list[np.ndarray]:
    return [np.full((height, width, 3), (i * 6 % 256, 90, 200 - i), np.uint8) for i in range(count)]


def one_line_error_naming(path: Path, excinfo: pytest.ExceptionInfo) -> str:
    message = str(excinfo.value)
    assert str(path) in message and "\n" not in message
    return message


@pytest.fixture(scope="module")
def clips(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Small clips made with the bundled ffmpeg: odd rates, rotation metadata, damaged files."""
    folder = tmp_path_factory.mktemp("clips")
    made = {
        "odd_rate": synthetic_clip(folder / "odd_rate.mp4", "736/25", 30),
        "ntsc": synthetic_clip(folder / "ntsc.mp4", "30000/1001", 20),
    }
    # A frame with a white top-left corner, stored losslessly, then marked "turn 90 degrees for display".
    corner = np.zeros((32, 64, 3), np.uint8)
    corner[:8, :8] = 255
    plain = folder / "corner.mp4"
    ffmpeg("-f", "rawvideo", "-pix_fmt", "rgb24", "-s", "64x32", "-r", "10", "-i", "-", "-c:v", "libx264", "-qp", "0", "-pix_fmt", "yuv444p", str(plain), stdin=corner.tobytes() * 3)
    made["rotated"] = folder / "rotated.mp4"
    ffmpeg("-display_rotation", "90", "-i", str(plain), "-c", "copy", str(made["rotated"]))
    long_clip = folder / "long.mp4"
    ffmpeg("-f", "lavfi", "-i", "testsrc2=size=320x240:rate=25", "-frames:v", "50", "-c:v", "libx264", "-movflags", "+faststart", str(long_clip))
    made["truncated"] = folder / "truncated.mp4"
    made["truncated"].write_bytes(long_clip.read_bytes()[: long_clip.stat().st_size * 2 // 3])
    made["no_frames"] = folder / "no_frames.mp4"
    ffmpeg("-f", "lavfi", "-i", "testsrc2=size=64x64:rate=25", "-frames:v", "0", "-c:v", "libx264", str(made["no_frames"]))
    made["audio_only"] = folder / "audio_only.m4a"
    ffmpeg("-f", "lavfi", "-i", "anullsrc", "-t", "0.5", "-c:a", "aac", str(made["audio_only"]))
    made["trimmed"] = folder / "trimmed.mp4"  # an edit list starting 0.33 s in: 9 packets decoded but never shown
    ffmpeg("-ss", "0.33", "-i", str(long_clip), "-c", "copy", str(made["trimmed"]))
    made["variable"] = folder / "variable.mp4"  # 10 frames 1/20 s apart, then 10 frames 0.08 s apart
    ffmpeg("-f", "lavfi", "-i", "testsrc2=size=64x64:rate=25", "-frames:v", "20", "-vf", "settb=1/1000,setpts='if(lt(N,10),0.05*N,0.5+0.08*(N-10))/TB'", "-fps_mode", "vfr", "-enc_time_base", "1:1000", "-c:v", "libx264", str(made["variable"]))
    garbled = folder / "garbled.mov"  # motion JPEG: frames demux (no parser checks them) but do not decode
    ffmpeg("-f", "lavfi", "-i", "testsrc2=size=160x120:rate=25", "-frames:v", "30", "-c:v", "mjpeg", "-movflags", "+faststart", str(garbled))
    data = bytearray(garbled.read_bytes())
    noise = np.random.default_rng(0).integers(0, 256, len(data) // 5, dtype=np.uint8).tobytes()
    data[len(data) // 2 : len(data) // 2 + len(noise)] = noise
    made["undecodable"] = folder / "undecodable.mov"
    made["undecodable"].write_bytes(bytes(data))
    made["text"] = folder / "notes.mp4"
    made["text"].write_text("not a video\n")
    return made


# -- probing and reading ---------------------------------------------------------


@pytest.mark.parametrize("name", REAL_CLIPS)
def test_real_clips_probe_and_decode_exactly(name: str):
    path = require(MEDIA / name, "test clip")
    info = video.probe_video(path)
    assert (info.width, info.height, info.rotation) == (512, 512, 0)
    assert info.rate == Fraction(15) and info.fps == 15.0
    assert info.frame_count == REAL_CLIPS[name]
    assert info.duration == pytest.approx(REAL_CLIPS[name] / 15)
    assert info.has_audio
    frames = list(video.read_frames(path))
    assert len(frames) == info.frame_count
    assert frames[0].shape == (512, 512, 3) and frames[0].dtype == np.uint8


def test_odd_rates_are_exact_fractions(clips):
    odd = video.probe_video(clips["odd_rate"])
    assert odd.rate == Fraction(736, 25) and odd.fps == 29.44
    assert (odd.frame_count, odd.width, odd.height, odd.has_audio) == (30, 160, 120, False)
    assert sum(1 for _ in video.read_frames(clips["odd_rate"])) == 30
    ntsc = video.probe_video(clips["ntsc"])
    assert ntsc.rate == Fraction(30000, 1001) and ntsc.frame_count == 20
    assert ntsc.duration == pytest.approx(20 * 1001 / 30000)


def test_probing_demuxes_once_and_decodes_nothing(clips, monkeypatch):
    commands = []
    real_run = subprocess.run
    monkeypatch.setattr(subprocess, "run", lambda command, *a, **k: commands.append(command) or real_run(command, *a, **k))
    info = video.probe_video(clips["odd_rate"])
    assert len(commands) == 1 and "framecrc" in commands[0] and commands[0][commands[0].index("-c") + 1] == "copy"
    assert "rawvideo" not in commands[0] and "null" not in commands[0]
    assert not info.variable_rate and np.allclose(info.timestamps, np.arange(30) * 25 / 736)


def test_a_clip_that_demuxes_but_does_not_decode_probes_and_fails_while_read(clips):
    info = video.probe_video(clips["undecodable"])
    assert info.frame_count == 30 and info.rate == 25
    with pytest.raises(HellomemeError) as excinfo:
        list(video.read_frames(info))
    assert "corrupt or truncated" in one_line_error_naming(clips["undecodable"], excinfo)


def test_an_edit_list_counts_only_the_frames_shown(clips):
    info = video.probe_video(clips["trimmed"])
    assert info.frame_count == sum(1 for _ in video.read_frames(info)) == 41
    assert info.timestamps[0] == 0 and info.duration == pytest.approx(41 / 25)


def test_a_variable_rate_clip_has_its_timestamps_and_a_rate_that_drops_no_frame(clips):
    info = video.probe_video(clips["variable"])
    expected = np.r_[np.arange(10) * 0.05, 0.5 + np.arange(10) * 0.08]
    assert info.variable_rate and info.frame_count == 20 and np.allclose(info.timestamps, expected, atol=1e-3)
    assert info.rate == Fraction(24000, 1001) and info.duration == pytest.approx(expected[-1] + 0.08, abs=1e-3)  # the fastest interval is 1/20 s
    assert sum(1 for _ in video.read_frames(info)) == 20


def test_rotation_is_applied_when_reading(clips):
    info = video.probe_video(clips["rotated"])
    assert info.rotation == 90 and (info.width, info.height) == (32, 64)
    frame = next(video.read_frames(clips["rotated"]))
    assert frame.shape == (64, 32, 3)
    corner = np.zeros((32, 64, 3), np.uint8)
    corner[:8, :8] = 255
    # 90 degrees counter-clockwise: the top-left corner ends up bottom-left.
    assert np.abs(frame.astype(int) - np.rot90(corner, 1)).mean() < 2
    assert np.abs(frame.astype(int) - np.rot90(corner, -1)).mean() > 10


def test_max_frames_stops_early():
    path = require(MEDIA / "jue.mp4", "test clip")
    assert sum(1 for _ in video.read_frames(path, max_frames=5)) == 5


@pytest.mark.parametrize(
    "clip, problem",
    [
        ("text", "not a video"),
        ("truncated", "corrupt or truncated"),
        ("no_frames", "no video stream"),
        ("audio_only", "no video stream"),
    ],
)
def test_bad_clips_are_refused_in_one_line(clips, clip: str, problem: str):
    with pytest.raises(HellomemeError) as excinfo:
        video.probe_video(clips[clip])
    assert problem in one_line_error_naming(clips[clip], excinfo)


def test_a_truncated_clip_fails_while_reading_rather_than_ending_early(clips):
    with pytest.raises(HellomemeError, match="corrupt or truncated"):
        list(video.read_frames(clips["truncated"]))


def test_images_missing_files_and_folders_are_not_videos(tmp_path: Path):
    image = require(MEDIA / "majicmix1.jpg", "test portrait")
    for path, problem in [(image, "is an image, not a video"), (tmp_path / "gone.mp4", "no such file"), (tmp_path, "is a folder")]:
        with pytest.raises(HellomemeError) as excinfo:
            video.read_frames(path)
        assert problem in one_line_error_naming(path, excinfo)


# -- images -------------------------------------------------------------------------


def test_read_image_applies_exif_orientation(tmp_path: Path):
    picture = np.zeros((40, 80, 3), np.uint8)
    picture[:20, :20] = (255, 0, 0)
    ok, encoded = cv2.imencode(".jpg", picture[..., ::-1], [cv2.IMWRITE_JPEG_QUALITY, 98])
    assert ok
    # EXIF orientation 6: the stored picture is shown turned 90 degrees clockwise.
    tiff = b"MM\x00\x2a" + (8).to_bytes(4, "big") + (1).to_bytes(2, "big")
    tiff += b"\x01\x12" + (3).to_bytes(2, "big") + (1).to_bytes(4, "big") + (6).to_bytes(2, "big") + b"\x00\x00"
    tiff += (0).to_bytes(4, "big")
    payload = b"Exif\x00\x00" + tiff
    data = encoded.tobytes()
    path = tmp_path / "turned.jpg"
    path.write_bytes(data[:2] + b"\xff\xe1" + (len(payload) + 2).to_bytes(2, "big") + payload + data[2:])
    image = video.read_image(path)
    assert image.shape == (80, 40, 3)
    assert np.abs(image.astype(int) - np.rot90(picture, -1)).mean() < 3


def test_read_image_puts_transparency_on_white(tmp_path: Path):
    rgba = np.zeros((16, 16, 4), np.uint8)
    rgba[..., 2] = 255  # blue in BGRA
    rgba[:, :8, 3] = 255  # left half opaque, right half transparent
    path = tmp_path / "half.png"
    cv2.imwrite(str(path), rgba)
    image = video.read_image(path)
    assert image.shape == (16, 16, 3)
    assert (image[:, :8] == (255, 0, 0)).all() and (image[:, 8:] == 255).all()


def test_read_image_refuses_what_is_not_an_image(tmp_path: Path):
    path = tmp_path / "notes.png"
    path.write_text("hello")
    with pytest.raises(HellomemeError) as excinfo:
        video.read_image(path)
    assert "not an image" in one_line_error_naming(path, excinfo)


def test_write_image_round_trip_and_refusals(tmp_path: Path):
    picture = np.random.default_rng(0).integers(0, 256, (12, 10, 3), dtype=np.uint8)
    path = video.write_image(picture, tmp_path / "out.png")
    assert (video.read_image(path) == picture).all()
    with pytest.raises(HellomemeError, match="already exists"):
        video.write_image(picture[::-1], path)
    video.write_image(picture[::-1], path, force=True)
    assert (video.read_image(path) == picture[::-1]).all()
    with pytest.raises(HellomemeError, match="input"):
        video.write_image(picture, path, force=True, protect=[path])
    with pytest.raises(HellomemeError, match="extension"):
        video.write_image(picture, tmp_path / "out.nope")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.png"]


# -- writing videos -------------------------------------------------------------------


def test_write_video_round_trip_with_trimmed_audio_and_metadata(tmp_path: Path):
    audio = require(MEDIA / "jue.mp4", "test clip")  # 5.6 s of audio for 1.36 s of video
    frames = flat_frames(40, 120, 160)
    events = []
    out = video.write_video(iter(frames), tmp_path / "out.mp4", 29.44, audio_from=audio, metadata={"comment": "seed=42", "hellomeme_seed": "42"}, progress=events.append, total=40)
    info = video.probe_video(out)
    assert info.frame_count == 40 and info.rate == Fraction(736, 25)
    assert info.has_audio
    assert abs(audio_duration(out) - info.duration) < 1 / info.fps
    assert info.tags["comment"] == "seed=42" and info.tags["hellomeme_seed"] == "42"
    decoded = list(video.read_frames(out))
    assert max(np.abs(a.astype(int) - b).max() for a, b in zip(decoded, frames)) <= 4
    assert [e.completed for e in events] == list(range(1, 41)) and events[-1].total == 40


def test_short_audio_is_padded_to_the_video(tmp_path: Path):
    audio = require(MEDIA / "qie.mp4", "test clip")  # 2.5 s of audio for 4 s of video
    out = video.write_video(flat_frames(60, 64, 64), tmp_path / "out.mp4", 15, audio_from=audio)
    info = video.probe_video(out)
    assert info.frame_count == 60
    assert abs(audio_duration(out) - 4.0) < 1 / 15


def test_ntsc_rate_and_no_audio(tmp_path: Path):
    out = video.write_video(flat_frames(20, 64, 64), tmp_path / "out.mp4", 30000 / 1001)
    info = video.probe_video(out)
    assert info.rate == Fraction(30000, 1001) and info.frame_count == 20 and not info.has_audio


def test_odd_sizes_are_padded_by_repeating_the_edge(tmp_path: Path):
    frame = np.zeros((121, 161, 3), np.uint8)
    frame[-1, :] = 200
    frame[:, -1] = 200
    out = video.write_video([frame] * 3, tmp_path / "odd.mp4", 10)
    decoded = next(video.read_frames(out))
    assert decoded.shape == (122, 162, 3)
    assert decoded[-1, 20:140].mean() > 150 and decoded[20:100, -1].mean() > 150


@pytest.mark.parametrize("interruption", [RuntimeError("generation failed"), KeyboardInterrupt()])
def test_an_interrupted_write_leaves_nothing_behind(tmp_path: Path, interruption: BaseException):
    def frames():
        yield from flat_frames(5, 64, 64)
        raise interruption

    with pytest.raises(type(interruption)):
        video.write_video(frames(), tmp_path / "out.mp4", 15)
    assert list(tmp_path.iterdir()) == []


def test_inputs_and_existing_files_are_protected(tmp_path: Path):
    clip = tmp_path / "drive.mp4"
    video.write_video(flat_frames(3, 64, 64), clip, 15)
    before = clip.read_bytes()
    with pytest.raises(HellomemeError, match="refusing to write over an input"):
        video.write_video(flat_frames(3, 64, 64), clip, 15, force=True, protect=[tmp_path / "." / "drive.mp4"])
    with pytest.raises(HellomemeError, match="refusing to write over an input"):
        video.write_video(flat_frames(3, 64, 64), clip, 15, force=True, audio_from=clip)
    with pytest.raises(HellomemeError, match="already exists"):
        video.write_video(flat_frames(3, 64, 64), clip, 15)
    assert clip.read_bytes() == before
    video.write_video(flat_frames(5, 64, 64), clip, 15, force=True)
    assert video.probe_video(clip).frame_count == 5
    assert sorted(p.name for p in tmp_path.iterdir()) == ["drive.mp4"]


def test_bad_frames_and_destinations_are_refused(tmp_path: Path):
    with pytest.raises(HellomemeError, match="frame 1 is 32x32"):
        video.write_video([np.zeros((64, 64, 3), np.uint8), np.zeros((32, 32, 3), np.uint8)], tmp_path / "a.mp4", 15)
    with pytest.raises(HellomemeError, match="not RGB uint8"):
        video.write_video([np.zeros((64, 64, 3), np.float32)], tmp_path / "a.mp4", 15)
    with pytest.raises(HellomemeError, match="no frames"):
        video.write_video([], tmp_path / "a.mp4", 15)
    with pytest.raises(HellomemeError, match="does not exist"):
        video.write_video(flat_frames(2, 8, 8), tmp_path / "missing" / "a.mp4", 15)
    with pytest.raises(HellomemeError, match="not .avi"):
        video.write_video(flat_frames(2, 8, 8), tmp_path / "a.avi", 15)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    "last_words, expected",
    [
        ("[out#0/mp4 @ 0x1] Error writing trailer: No space left on device", "disk full"),
        ("[libx264 @ 0x1] something went wrong", "ffmpeg failed (something went wrong)"),
    ],
)
def test_ffmpeg_failures_are_one_line_errors(tmp_path: Path, monkeypatch, last_words: str, expected: str):
    fake = tmp_path / "fake-ffmpeg"
    fake.write_text(f"#!/bin/sh\necho '{last_words}' >&2\nexit 1\n")
    fake.chmod(fake.stat().st_mode | stat.S_IXUSR)
    monkeypatch.setattr(video, "ffmpeg_exe", lambda: str(fake))
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    with pytest.raises(HellomemeError) as excinfo:
        video.write_video(flat_frames(30, 64, 64), out_dir / "a.mp4", 15)
    assert expected in one_line_error_naming(out_dir / "a.mp4", excinfo)
    assert os.listdir(out_dir) == []


def test_without_imageio_ffmpeg_the_systems_ffmpeg_is_used_or_one_line_says_what_to_install(tmp_path, monkeypatch):
    import sys

    from hellomeme_cli.errors import HellomemeError
    from hellomeme_cli.media.video import ffmpeg_exe

    monkeypatch.setitem(sys.modules, "imageio_ffmpeg", None)  # import fails, as on a machine without the package
    system = tmp_path / "ffmpeg"
    system.write_text("#!/bin/sh\n")
    system.chmod(0o755)
    monkeypatch.setenv("PATH", str(tmp_path))
    assert ffmpeg_exe() == str(system)
    monkeypatch.setenv("PATH", str(tmp_path / "nothing"))
    with pytest.raises(HellomemeError, match="no ffmpeg: install imageio-ffmpeg"):
        ffmpeg_exe()
