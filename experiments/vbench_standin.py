"""Write seeded RANDOM stand-in weights at every path VBench 0.1.5 reads for sensq's 5 dimensions, so that
`sensq eval --vbench` can be run end to end against the real vbench package where the real weights cannot
be fetched (this project's machines). The scores it then gives are MEANINGLESS: this checks the plumbing
(separate interpreter, offline local mode, naming, per-video parsing, scales), never video quality.

Run it with the VBench environment's interpreter (it imports vbench, clip, pyiqa, timm):

    ~/vbench-env/bin/python experiments/vbench_standin.py --cache /tmp/vb-cache --torch-home /tmp/vb-torch
    sensq eval RUN --vbench --vbench-python ~/vbench-env/bin/python --vbench-cache /tmp/vb-cache \\
        --torch-home /tmp/vb-torch

Same architectures and keys as the real files (the DINO hub code is a stand-in too: a timm ViT-B/16
behind the same `dino_vitb16` entry point). Large ones are stored in fp16 (~1.7 GB in all).
"""

import argparse
import os
import shutil
from pathlib import Path

import torch

HUBCONF = '''"""STAND-IN for github.com/facebookresearch/dino's hubconf (sensq experiments/vbench_standin.py):
a timm ViT-B/16 feature extractor with random weights, loaded like DINO's from the torch hub cache."""
import timm
import torch

dependencies = ["torch", "timm"]
URL = "https://dl.fbaipublicfiles.com/dino/dino_vitbase16_pretrain/dino_vitbase16_pretrain.pth"


def dino_vitb16(pretrained=True, **kwargs):
    model = timm.create_model("vit_base_patch16_224", num_classes=0, dynamic_img_size=True)
    if pretrained:
        model.load_state_dict(torch.hub.load_state_dict_from_url(URL, map_location="cpu"))
    return model
'''


# parameters the architectures leave as torch.empty() (or zero) for the real weights to fill: ViCLIP's
# viclip_text.py / viclip_vision.py
UNINITIALIZED = ("text_encoder.positional_embedding", "text_encoder.text_projection", "vision_encoder.proj")


def _sane(state: dict) -> dict:
    """Give the parameters a random-init module leaves uninitialized (torch.empty garbage, zero projections)
    small seeded Gaussian values, so that features are finite, nonzero and the same on every run."""
    out = {}
    for k, v in state.items():
        if v.is_floating_point() and (k in UNINITIALIZED or not torch.isfinite(v).all()
                                      or (v.dim() >= 2 and v.abs().max() == 0)):
            v = torch.randn_like(v) * 0.02
        out[k] = v
    return out


def _half(state: dict) -> dict:
    return {k: v.half() if v.is_floating_point() else v for k, v in _sane(state).items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cache", type=Path, required=True, help="VBENCH_CACHE_DIR to fill.")
    parser.add_argument("--torch-home", type=Path, required=True, help="TORCH_HOME to fill (DINO's weights).")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    torch.manual_seed(args.seed)
    os.environ["VBENCH_CACHE_DIR"] = str(args.cache)  # vbench.utils reads it at import time (ViCLIP's tokenizer)
    cache, hub = args.cache, args.torch_home / "hub" / "checkpoints"

    def save(obj, rel: str, root: Path = cache) -> None:
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.save(obj, path)
        print(f"wrote {path} ({path.stat().st_size / 1e6:.1f} MB)")

    # subject_consistency: DINO ViT-B/16 (code + weights; VBench also insists on its own unread copy)
    import timm

    dino = _sane(timm.create_model("vit_base_patch16_224", num_classes=0, dynamic_img_size=True).state_dict())
    code = cache / "dino_model" / "facebookresearch_dino_main"
    code.mkdir(parents=True, exist_ok=True)
    (code / "hubconf.py").write_text(HUBCONF)
    for name in ("vision_transformer.py", "utils.py"):
        (code / name).write_text('"""STAND-IN: the model comes from timm in hubconf.py."""\n')
    save(dino, "dino_vitbase16_pretrain.pth", hub)
    save(dino, "dino_model/dino_vitbase16_pretrain.pth")
    # aesthetic_quality: OpenAI CLIP ViT-L/14 as a TorchScript archive like OpenAI's (clip.load reads the
    # state dict of the scripted module; its fallback to a plain state dict re-reads an exhausted file) + the
    # LAION linear head
    from clip.model import CLIP

    clip_l = CLIP(embed_dim=768, image_resolution=224, vision_layers=24, vision_width=1024, vision_patch_size=14,
                  context_length=77, vocab_size=49408, transformer_width=768, transformer_heads=12,
                  transformer_layers=12).eval()
    with torch.no_grad():
        traced = torch.jit.trace(clip_l, (torch.randn(1, 3, 224, 224), torch.zeros(1, 77, dtype=torch.long)),
                                 check_trace=False).half()
    path = cache / "clip_model" / "ViT-L-14.pt"
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.jit.save(traced, path)
    print(f"wrote {path} ({path.stat().st_size / 1e6:.1f} MB)")
    del clip_l, traced
    save(torch.nn.Linear(768, 1).state_dict(), "aesthetic_model/emb_reader/sa_0_4_vit_l_14_linear.pth")
    # imaging_quality: MUSIQ (the SPAQ variant's architecture is pyiqa's default)
    from pyiqa.archs.musiq_arch import MUSIQ

    save(_sane(MUSIQ(pretrained=False).state_dict()), "pyiqa_model/musiq_spaq_ckpt-358bb6af.pth")
    # overall_consistency: ViCLIP-L + the CLIP BPE vocabulary
    import clip
    from vbench.third_party.ViCLIP.simple_tokenizer import SimpleTokenizer
    from vbench.third_party.ViCLIP.viclip import ViCLIP

    bpe = Path(clip.__file__).with_name("bpe_simple_vocab_16e6.txt.gz")
    (cache / "ViCLIP").mkdir(parents=True, exist_ok=True)
    shutil.copy(bpe, cache / "ViCLIP" / bpe.name)
    viclip = ViCLIP(tokenizer=SimpleTokenizer(str(bpe)), pretrain=None)
    save({"model": _half(viclip.state_dict())}, "ViCLIP/ViClip-InternVid-10M-FLT.pth")
    del viclip
    # motion_smoothness: AMT-S from VBench's own config
    import vbench
    from omegaconf import OmegaConf
    from vbench.third_party.amt.utils.build_utils import build_from_cfg

    config = OmegaConf.load(Path(vbench.__file__).parent / "third_party" / "amt" / "cfgs" / "AMT-S.yaml")
    save({"state_dict": _sane(build_from_cfg(config.network).state_dict())}, "amt_model/amt-s.pth")
    print("stand-in weights written: VBench scores computed with them are meaningless (plumbing check only)")


if __name__ == "__main__":
    main()
