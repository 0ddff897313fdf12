"""Video sampling by seeking: the frames wanted are picked from the header's frame count and fps, then reached by
seeking to a keyframe and decoding on, so a long video costs about a keyframe interval per frame kept rather
than its length; short videos give exactly the frames (and metadata) of decoding them whole. Every read has a
time budget and a cap on frames decoded, and falls back to decoding in order when the file cannot seek or its
header is wrong."""

from __future__ import annotations

import io
import time
from fractions import Fraction

import av
import numpy as np
import pytest

from mmserve.multimodal.media import MediaError, MediaPolicy, VideoReader, load_video_frames
from mmserve.multimodal.processor import sample_frame_indices

# ----------------------------------------------------------------------------------------------- helpers

WIDTH, HEIGHT = 32, 16


def index_frame(i: int) -> np.ndarray:
    """A 16x32 gray frame whose eight 8x8 blocks spell `i` in base 4 (levels 32, 96, 160, 224: codec-proof)."""
    digits = [(i >> (2 * k)) & 3 for k in range(8)]
    blocks = np.array([32 + 64 * d for d in digits], np.uint8).reshape(2, 4)
    return np.repeat(np.repeat(blocks, 8, 0), 8, 1)


def frame_index(rgb: np.ndarray) -> int:
    """The index `index_frame` wrote into a decoded frame."""
    blocks = rgb[..., 0].reshape(2, 8, 4, 8).mean(axis=(1, 3)).reshape(-1)
    digits = np.clip(np.round((blocks - 32) / 64), 0, 3).astype(int)
    return sum(int(d) << (2 * k) for k, d in enumerate(digits))


def make_video(frames: int, fps: float | Fraction, keyframe_every: int, container: str = "mp4",
               codec: str = "libx264") -> bytes:
    """Frame i shows its index (see index_frame); a keyframe every `keyframe_every` frames, no scene-cut ones."""
    buf = io.BytesIO()
    options = {"g": str(keyframe_every), "keyint_min": str(keyframe_every)}
    if codec == "libx264":
        options.update(preset="ultrafast", tune="zerolatency", sc_threshold="0")
    with av.open(buf, "w", format=container) as out:
        stream = out.add_stream(codec, rate=fps, options=options)
        stream.width, stream.height, stream.pix_fmt = WIDTH, HEIGHT, "yuv420p"
        for i in range(frames):
            for packet in stream.encode(av.VideoFrame.from_ndarray(index_frame(i), format="gray")):
                out.mux(packet)
        for packet in stream.encode():
            out.mux(packet)
    return buf.getvalue()


def qwen(max_frames: int = 768):
    """The processor's choice of frames: Qwen's 2 fps, 4 to `max_frames` frames, an even count."""
    return lambda total, fps: sample_frame_indices(total, fps, 2.0, 4, max_frames)


@pytest.fixture(scope="module")
def long_video() -> bytes:
    """10 minutes at 10 fps (6000 frames), a keyframe every second."""
    return make_video(6000, 10, keyframe_every=10)


# ----------------------------------------------------------------------------------------------- seeking


def test_long_video_is_sampled_by_seeking(long_video):
    with VideoReader(long_video, MediaPolicy()) as video:
        assert (video.frame_count, video.fps, video.width, video.height) == (6000, 10.0, WIDTH, HEIGHT)
        start = time.monotonic()
        clip = video.sample(qwen(max_frames=16), max_frames=16)
        elapsed = time.monotonic() - start
        decoded, seeks = video.frames_decoded, video.seeks
    expected = sample_frame_indices(6000, 10.0, 2.0, 4, 16).tolist()
    assert clip.indices == expected and (clip.fps, clip.total_frames) == (10.0, 6000)
    assert [frame_index(f) for f in clip.frames] == expected  # the right frames, not just the right count
    with av.open(io.BytesIO(long_video)) as container:  # decoded from the start, for comparison
        whole = {i: frame.to_ndarray(format="rgb24") for i, frame in enumerate(container.decode(video=0))
                 if i in expected}
    assert np.array_equal(clip.frames, np.stack([whole[i] for i in expected]))  # from a keyframe: the same pixels
    # About one keyframe interval (10 frames) per frame kept, not 6000.
    assert seeks >= 14 and decoded <= 16 * 11, (seeks, decoded)
    assert elapsed < 1, elapsed  # about 0.02 s here; decoding all 6000 frames takes a second or more


def test_dense_sampling_decodes_on_instead_of_seeking(long_video):
    # At the default 768 frames the wanted frames are ~8 apart, closer than the keyframes: decoding on is cheaper.
    with VideoReader(long_video, MediaPolicy()) as video:
        clip = video.sample(qwen(), max_frames=768)
        assert video.seeks == 0 and video.frames_decoded == 6000
    assert clip.indices == sample_frame_indices(6000, 10.0, 2.0, 4, 768).tolist()
    assert [frame_index(f) for f in clip.frames[::50]] == clip.indices[::50]


def test_sparse_keyframes_do_not_multiply_the_work():
    """One keyframe in 3000 frames: a seek lands back at the start, so the reader stops seeking and decodes on
    (each frame once), instead of decoding the video again for every frame wanted."""
    data = make_video(3000, 10, keyframe_every=100_000)
    with VideoReader(data, MediaPolicy()) as video:
        clip = video.sample(qwen(max_frames=16), max_frames=16)  # 200 frames apart: far enough to try a seek
        assert 1 <= video.seeks <= 2 and video.frames_decoded < 1.5 * 3000, (video.seeks, video.frames_decoded)
    assert [frame_index(f) for f in clip.frames] == clip.indices == sample_frame_indices(3000, 10, 2, 4, 16).tolist()


@pytest.mark.parametrize(("container", "codec"), [("mp4", "libx264"), ("matroska", "libx264"), ("webm", "libvpx"),
                                                  ("avi", "mpeg4")])
@pytest.mark.parametrize("fps", [Fraction(30000, 1001), 7, Fraction(1, 2)])
def test_short_videos_give_the_frames_of_a_whole_decode(container, codec, fps):
    """Same frames and the same metadata as decoding everything and sampling, whatever the rate (NTSC, 7 fps, one
    frame every 2 s) and container (a frame count in MP4 and AVI, only a duration in Matroska/WebM)."""
    data = make_video(45, fps, keyframe_every=12, container=container, codec=codec)
    whole, whole_fps = load_video_frames(data, MediaPolicy())
    expected = sample_frame_indices(len(whole), whole_fps, 2.0, 4, 768)
    with VideoReader(data, MediaPolicy()) as video:
        clip = video.sample(qwen(), max_frames=768)
    assert (clip.fps, clip.total_frames, clip.indices) == (pytest.approx(float(fps)), 45, expected.tolist())
    assert np.array_equal(clip.frames, whole[expected])


def test_weird_declared_rate():
    """A stream declared at 1000 fps: 60 frames are 0.06 s, so Qwen's sampling takes its minimum of 4 frames,
    spread over the whole clip, and the metadata keeps the declared rate for the processor's timing."""
    data = make_video(60, 1000, keyframe_every=10)
    with VideoReader(data, MediaPolicy()) as video:
        clip = video.sample(qwen(), max_frames=768)
    assert clip.fps == 1000.0 and clip.total_frames == 60 and clip.indices == [0, 20, 39, 59]
    assert [frame_index(f) for f in clip.frames] == [0, 20, 39, 59]


# ----------------------------------------------------------------------------------------------- fallbacks


def test_header_overstating_the_length_falls_back_to_a_whole_decode():
    data = make_video(40, 10, keyframe_every=10)
    with VideoReader(data, MediaPolicy()) as video:
        video.frame_count = 400  # as if the header claimed 40 s
        clip = video.sample(qwen(), max_frames=768)
    whole, _ = load_video_frames(data, MediaPolicy())
    expected = sample_frame_indices(40, 10.0, 2.0, 4, 768)
    assert (clip.total_frames, clip.indices) == (40, expected.tolist())
    assert np.array_equal(clip.frames, whole[expected])


def test_unknown_length_decodes_in_order_keeping_at_most_max_frames():
    data = make_video(40, 10, keyframe_every=10)
    with VideoReader(data, MediaPolicy()) as video:
        video.frame_count = None
        clip = video.sample(qwen(), max_frames=10)
    # 40 frames thinned to every 4th (10 kept, at 2.5 fps), then Qwen's sampling among those.
    assert (clip.total_frames, clip.fps) == (10, 2.5)
    assert clip.indices == sample_frame_indices(10, 2.5, 2.0, 4, 768).tolist()
    assert [frame_index(f) for f in clip.frames] == [4 * i for i in clip.indices]


def test_a_file_that_cannot_seek_is_decoded_on(long_video, monkeypatch):
    class NoSeek:
        def __init__(self, container):
            self._container = container

        def seek(self, *args, **kwargs):
            raise av.error.ValueError(22, "seeking is broken")

        def __getattr__(self, name):
            return getattr(self._container, name)

    opened = VideoReader._open
    monkeypatch.setattr(VideoReader, "_open", lambda self: (lambda c, s: (NoSeek(c), s))(*opened(self)))
    with VideoReader(long_video, MediaPolicy()) as video:
        clip = video.sample(qwen(max_frames=16), max_frames=16)
        assert video.seeks == 0
    assert [frame_index(f) for f in clip.frames] == clip.indices == sample_frame_indices(6000, 10, 2, 4, 16).tolist()


# ----------------------------------------------------------------------------------------------- budgets


def test_decode_time_budget(long_video):
    start = time.monotonic()
    with pytest.raises(MediaError, match=r"^video 0: decoding took longer than 0\.05 s$"):
        with VideoReader(long_video, MediaPolicy(video_decode_timeout_s=0.05), "video 0") as video:
            video.read_all(16)
    assert time.monotonic() - start < 2


def test_decoded_frame_cap(long_video):
    with pytest.raises(MediaError, match=r"^video 0: decoding needs more than 500 frames"):
        with VideoReader(long_video, MediaPolicy(max_decoded_frames=500), "video 0") as video:
            video.sample(qwen(), max_frames=768)
    # Seeking to 16 frames stays well under the same cap.
    with VideoReader(long_video, MediaPolicy(max_decoded_frames=500), "video 0") as video:
        assert len(video.sample(qwen(max_frames=16), max_frames=16).frames) == 16


def test_large_frames_shrink_like_images():
    data = make_video(8, 4, keyframe_every=4)
    with VideoReader(data, MediaPolicy(), target_pixels=WIDTH * HEIGHT // 4) as video:
        assert video.factor == 2 and video.frame_bytes == (WIDTH // 2) * (HEIGHT // 2) * 3
        assert video.decode_bytes == WIDTH * HEIGHT * 3
        clip = video.sample(qwen(), max_frames=768)
    assert clip.frames.shape == (4, HEIGHT // 2, WIDTH // 2, 3)
    with VideoReader(data, MediaPolicy(), target_pixels=WIDTH * HEIGHT // 3) as video:
        assert video.factor == 1  # under 4x the target: frames are kept whole
