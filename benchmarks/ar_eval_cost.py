"""Cost of one importance sample of the 784-512-512-50 decoder with and without a PixelCNN
head (early and late fusion): iw_nll on random binary images, untrained weights.

    python benchmarks/ar_eval_cost.py --threads 2

Prints microseconds per (image, sample) and what k = 5000 on 10,000 test images would take.
"""

import argparse
import time

import torch

from vaekit.evaluate import iw_nll
from vaekit.models import VAE, ModelConfig


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--batch-size", type=int, default=100)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    x = torch.rand(args.batch_size, 1, 28, 28).bernoulli()
    rows = []
    for name, layers, fusion, k in [("plain decoder", 0, "early", 200), ("PixelCNN head, late fusion", 4, "late", 200),
                                    ("PixelCNN head, early fusion", 4, "early", 10)]:
        torch.manual_seed(0)
        head = dict(pixelcnn_layers=layers, pixelcnn_width=32, pixelcnn_fusion=fusion) if layers else {}
        model = VAE(ModelConfig(arch="mlp", input_shape=(1, 28, 28), latent_dim=50, hidden=(512, 512),
                                activation="elu", **head)).eval()
        with torch.no_grad():
            iw_nll(model, x[:10], 5)  # warm-up
            t = time.perf_counter()
            iw_nll(model, x, k)
            per = (time.perf_counter() - t) / (args.batch_size * k)
        rows.append((name, per))
    base = rows[0][1]
    print(f"{'decoder':<30} {'us/sample':>10} {'x plain':>8} {'k=5000 x 10,000':>16}")
    for name, per in rows:
        print(f"{name:<30} {per * 1e6:>10.1f} {per / base:>8.1f} {per * 5e7 / 60:>12.0f} min")


if __name__ == "__main__":
    main()
