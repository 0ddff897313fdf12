"""How the image processor's time on this host depends on torch's thread count (issue 16's V2, large images):
transformers' processor call alone and MultimodalProcessor.process around it, for 448x448 and 896x672 images.

    python scripts/processor_threads.py --tokenizer-dir .gpu/tokenizer
"""
import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from transformers import AutoConfig, AutoProcessor

from mmserve.bench.presets import write_preset
from mmserve.config import ServerArgs
from mmserve.multimodal.processor import MultimodalProcessor
from mmserve.multimodal.processors import ProcessorRegistry

parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
parser.add_argument("--tokenizer-dir", required=True)
parser.add_argument("--preset", default="qwen2.5-vl-7b")
args = parser.parse_args()
d = write_preset(args.preset, Path(args.tokenizer_dir), Path(tempfile.mkdtemp()))
p = AutoProcessor.from_pretrained(d)
cfg = AutoConfig.from_pretrained(d)
mp = MultimodalProcessor(ServerArgs(model_path=str(d), mm_processor_cache_mb=0, mm_processor_pool="thread"),
                         ProcessorRegistry.resolve(cfg.architectures), cfg, d)
rng = np.random.RandomState(0)
print("default threads", torch.get_num_threads())
for threads in (16, 8, 4, 2, 1):
    torch.set_num_threads(threads)
    for w, h in ((448, 448), (896, 672)):
        imgs = [Image.fromarray(rng.randint(0, 255, (h, w, 3), dtype=np.uint8)) for _ in range(6)]
        p(text=["<|image_pad|>"], images=[imgs[0]], return_tensors="pt")
        t = time.perf_counter()
        for im in imgs[1:]:
            p(text=["<|image_pad|>"], images=[im], return_tensors="pt")
        hf = (time.perf_counter() - t) / 5 * 1e3
        t = time.perf_counter()
        for im in imgs[1:]:
            mp.process("<|vision_start|><|image_pad|><|vision_end|>Hi", [("image", im)])
        ours = (time.perf_counter() - t) / 5 * 1e3
        print(f"threads {threads:2d} {w}x{h}: HF processor {hf:.1f} ms, MultimodalProcessor.process {ours:.1f} ms")
mp.close()
