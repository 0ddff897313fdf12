"""Audio loading (multimodal/media.py) in-process: the containers and codecs a client may send, decoded to mono float32
at the model's rate; OpenAI's input_audio parts; the byte and duration limits; the URL and local-file rules images
have (SSRF refusals, the allowed folder); and a model without audio refusing a clip by name."""

from __future__ import annotations

import base64
import io

import av
import numpy as np
import pytest
from audio_helpers import tone, wav_bytes

from mmserve.multimodal.media import MediaError, MediaPolicy, audio_bytes, load_audio, open_audio


def encoded(samples: np.ndarray, rate: int, container: str, codec: str) -> bytes:
    """`samples` (mono) through FFmpeg's `codec` in `container`."""
    buf = io.BytesIO()
    with av.open(buf, "w", format=container) as out:
        stream = out.add_stream(codec, rate=rate, layout="mono")
        frame_size = stream.codec_context.frame_size or 1024
        fmt = stream.codec_context.format.name
        pts = 0
        for start in range(0, len(samples), frame_size):
            piece = samples[start:start + frame_size]
            frame = av.AudioFrame.from_ndarray(piece[None].astype(np.float32), format="flt", layout="mono")
            frame.sample_rate, frame.pts = rate, pts
            pts += len(piece)
            frame = av.AudioResampler(format=fmt, layout="mono", rate=rate).resample(frame)[0]
            for packet in stream.encode(frame):
                out.mux(packet)
        for packet in stream.encode():
            out.mux(packet)
    return buf.getvalue()


def test_wav_decodes_to_its_samples_and_resamples():
    samples = tone(440, 1.0)
    np.testing.assert_array_equal(load_audio(wav_bytes(samples), MediaPolicy(), 16000), samples)
    half = load_audio(wav_bytes(samples), MediaPolicy(), 8000)
    assert len(half) == 8000 and abs(np.abs(half).max() - 0.5) < 0.02
    # two channels of 44.1 kHz: averaged to mono, resampled to 16 kHz
    stereo = load_audio(wav_bytes(tone(300, 0.5, 44100), 44100, channels=2), MediaPolicy(), 16000)
    assert len(stereo) == 8000 and stereo.dtype == np.float32


@pytest.mark.parametrize(("container", "codec"), [("flac", "flac"), ("mp3", "libmp3lame"), ("ogg", "libopus"),
                                                  ("ipod", "aac"), ("webm", "libopus")])
def test_compressed_formats_decode(container, codec):
    rate = 48000 if codec == "libopus" else 16000
    samples = tone(440, 1.0, rate)
    out = load_audio(encoded(samples, rate, container, codec), MediaPolicy(), 16000)
    assert abs(len(out) - 16000) < 1200  # codec priming and padding
    assert 0.4 < np.abs(out).max() < 0.6  # the tone's amplitude survives
    if codec == "flac":  # lossless
        np.testing.assert_array_equal(out, tone(440, 1.0))


def test_input_audio_parts_and_data_urls():
    data = wav_bytes(tone(200, 0.5))
    b64 = base64.b64encode(data).decode()
    policy = MediaPolicy()
    assert audio_bytes({"data": b64, "format": "wav"}, policy) == data
    assert audio_bytes({"url": "data:audio/wav;base64," + b64}, policy) == data
    assert audio_bytes("data:audio/mpeg;base64," + b64, policy) == data  # the bytes, not the type, pick the demuxer
    for part, message in [({"data": b64, "format": "aiff"}, "input_audio.format must be one of wav, mp3"),
                          ({"data": "", "format": "wav"}, "input_audio.data must be a non-empty base64 string"),
                          ({"data": "a*b=", "format": "wav"}, "invalid base64 in input_audio.data"),
                          ("data:image/png;base64," + b64, "unsupported data URL media type 'image/png'")]:
        with pytest.raises(MediaError, match=message):
            audio_bytes(part, policy, "audio 1")
    with pytest.raises(MediaError, match="audio 0: not a supported audio format"):
        load_audio({"data": base64.b64encode(b"GIF89a" + bytes(64)).decode(), "format": "wav"}, policy, 16000,
                   "audio 0")
    with pytest.raises(MediaError, match="not a readable audio file|could not decode audio|no audio samples"):
        load_audio(data[:44], policy, 16000)  # a WAV header and no samples


def test_byte_and_duration_limits():
    data = wav_bytes(tone(200, 2.0))  # 64 KB, 2 s
    small = MediaPolicy(max_audio_bytes=32 * 1024)
    for source in (data, {"data": base64.b64encode(data).decode(), "format": "wav"},
                   "data:audio/wav;base64," + base64.b64encode(data).decode()):
        with pytest.raises(MediaError, match=r"audio 0: .*over the limit of .*--max-audio-mb"):
            audio_bytes(source, small, "audio 0")
    short = MediaPolicy(max_audio_seconds=1.5)
    with pytest.raises(MediaError, match=r"audio 0: the clip is 2.0 s long, over the limit of 1.5 s"):
        open_audio(data, short, "audio 0")  # from the header, before decoding
    with open_audio(data, MediaPolicy(), "audio 0") as clip:
        assert clip.seconds == 2.0 and clip.decoded_bytes(16000) == 2 * 16000 * 4


@pytest.mark.parametrize("url", ["http://127.0.0.1:9/a.wav", "http://10.0.0.7/a.wav", "https://[::1]/a.wav",
                                 "http://169.254.169.254/latest/meta-data"])
def test_private_urls_refused(url):
    with pytest.raises(MediaError, match="loopback, private, link-local or reserved"):
        audio_bytes({"url": url}, MediaPolicy(), "audio 0")


def test_local_files_only_under_the_allowed_folder(tmp_path):
    (tmp_path / "inside").mkdir()
    (tmp_path / "inside" / "a.wav").write_bytes(wav_bytes(tone(200, 0.25)))
    (tmp_path / "b.wav").write_bytes(wav_bytes(tone(200, 0.25)))
    with pytest.raises(MediaError, match="local files are not allowed"):
        audio_bytes(str(tmp_path / "b.wav"), MediaPolicy())
    allowed = MediaPolicy(allowed_local_media_path=str(tmp_path / "inside"))
    assert len(load_audio("file://" + str(tmp_path / "inside" / "a.wav"), allowed, 16000)) == 4000
    with pytest.raises(MediaError, match="outside the allowed local media directory"):
        audio_bytes(str(tmp_path / "inside" / ".." / "b.wav"), allowed)


def test_a_model_without_audio_refuses_it_by_name(tiny_qwen2_vl_dir):
    from transformers import AutoConfig

    from mmserve.config import ServerArgs
    from mmserve.multimodal.processor import MultimodalProcessor
    from mmserve.multimodal.processors import ProcessorRegistry

    config = AutoConfig.from_pretrained(tiny_qwen2_vl_dir)
    processor = MultimodalProcessor(ServerArgs(model_path=str(tiny_qwen2_vl_dir)),
                                    ProcessorRegistry.resolve(config.architectures), config, tiny_qwen2_vl_dir)
    try:
        with pytest.raises(MediaError, match="Qwen2VLForConditionalGeneration takes no audio input"):
            processor.check_counts([("image", None), ("audio", {"data": "", "format": "wav"})])
    finally:
        processor.close()
