"""`chestxpert data …`: synthesise, download and prepare datasets."""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def cmd_synth(args: argparse.Namespace) -> int:
    from chestxpert.datasets.synth import generate

    summary = generate(
        Path(args.out),
        images=args.images,
        size=args.size,
        seed=args.seed,
        difficulty=args.difficulty,
        label_noise=args.label_noise,
        workers=args.workers,
    )
    print(
        f"wrote {summary['images']} images of {summary['patients']} patients to {args.out} "
        f"in NIH layout ({summary['images_per_second']:.0f} images/s)"
    )
    return 0


def cmd_download(args: argparse.Namespace) -> int:
    from chestxpert.datasets import download

    if args.dataset == "nih-sample":
        root = download.download_nih_sample(
            Path(args.to), env_file=Path(args.env_file) if args.env_file else None
        )
    else:
        root = download.download_nih_full(Path(args.to), keep_archives=args.keep_archives)
    print(
        f"{args.dataset} is ready in {root}; "
        f"next: chestxpert data prepare --source nih --input {root} --out OUT"
    )
    return 0


def cmd_prepare(args: argparse.Namespace) -> int:
    from chestxpert.cluster.endpoints import resolve
    from chestxpert.datasets.prepare import PrepareOptions, prepare
    from chestxpert.datasets.schema import generation_of

    opts = PrepareOptions(
        source=args.source,
        image_size=args.image_size,
        split=args.split,
        val_fraction=args.val_fraction,
        test_fraction=args.test_fraction,
        seed=args.seed,
        views=tuple(v.strip() for v in args.views.split(",") if v.strip()),
        uncertain=args.uncertain,
        on_bad_image=args.on_bad_image,
        force=args.force,
        workers=args.workers,
        shard_rows=args.shard_rows,
        compression=args.compression,
        on_cluster=args.on_cluster,
    )
    if args.address and not args.on_cluster:
        print(f"note: --address {args.address} is used only with --on-cluster; preparing here")
    endpoints = resolve(
        ray_address=args.address, s3_endpoint_url=args.s3_endpoint, workspace=args.workspace
    )
    manifest = prepare(args.input, args.out, opts, endpoints)
    counts = {split: info["images"] for split, info in manifest["splits"].items()}
    print(
        f"prepared {args.out}: {json.dumps(counts)} images, digest {manifest['digest'][:12]}, "
        f"generation {generation_of(manifest)}"
    )
    if manifest.get("bad_images"):
        print(
            f"{manifest['bad_images']} bad image(s) skipped; "
            f"see {args.out}/{manifest['bad_images_report']}"
        )
    return 0


def register(sub: argparse._SubParsersAction) -> argparse._SubParsersAction:
    """Add `chestxpert data synth|download|prepare` to the command tree; return the `data`
    subcommands, so the app can add `data gc` (which needs the sweeps' layout) beside them."""
    data = sub.add_parser("data", help="synthesise, download and prepare datasets")
    data_sub = data.add_subparsers(dest="data_command", required=True, metavar="DATA_COMMAND")

    synth = data_sub.add_parser("synth", help="draw synthetic chest radiographs in the NIH layout")
    synth.add_argument(
        "--out", required=True, help="new folder to write (must not exist or be empty)"
    )
    synth.add_argument("--images", type=int, default=1000, help="number of images (default 1000)")
    synth.add_argument("--size", type=int, default=256, help="image side in pixels (default 256)")
    synth.add_argument("--seed", type=int, default=0, help="random seed; same seed, same files")
    synth.add_argument(
        "--difficulty", type=float, default=0.5, help="0 = obvious signs, 1 = subtle (default 0.5)"
    )
    synth.add_argument(
        "--label-noise", type=float, default=0.1, help="share of drawn findings left unlabelled"
    )
    synth.add_argument("--workers", type=int, default=None, help="processes (default: all cores)")
    synth.set_defaults(func=cmd_synth)

    download = data_sub.add_parser("download", help="fetch NIH ChestX-ray14 (needs internet)")
    download.add_argument(
        "dataset",
        choices=["nih-sample", "nih-full"],
        help="nih-sample: the Kaggle 5%% sample (5,606 images); nih-full: all 112,120 images",
    )
    download.add_argument("--to", required=True, help="folder to download and unpack into")
    download.add_argument(
        "--env-file", default=None, help="a .env file with KAGGLE_USERNAME / KAGGLE_KEY"
    )
    download.add_argument(
        "--keep-archives", action="store_true", help="keep the .tar.gz files after unpacking"
    )
    download.set_defaults(func=cmd_download)

    prep = data_sub.add_parser(
        "prepare", help="validate, split by patient, resize and shard into Parquet"
    )
    prep.add_argument(
        "--source", required=True, choices=["nih", "chexpert"], help="layout of --input"
    )
    prep.add_argument("--input", required=True, help="source folder or s3:// prefix")
    prep.add_argument("--out", required=True, help="output folder or s3:// prefix")
    prep.add_argument(
        "--image-size", type=int, required=True, help="square side in pixels (>= 32; 224 usual)"
    )
    prep.add_argument(
        "--split",
        default="patient",
        choices=["patient", "official"],
        help="patient: random split by patient; official: the source's own test list",
    )
    prep.add_argument(
        "--val-fraction", type=float, default=0.1, help="share of patients for validation"
    )
    prep.add_argument("--test-fraction", type=float, default=0.2, help="share of patients for test")
    prep.add_argument("--seed", type=int, default=0, help="random seed of the patient split")
    prep.add_argument("--views", default="PA,AP", help="views to keep (CheXpert), comma-separated")
    prep.add_argument(
        "--uncertain",
        default="ones",
        choices=["ones", "zeros", "ignore"],
        help="CheXpert's uncertain (-1) labels become 1, 0, or are left out of the loss",
    )
    prep.add_argument(
        "--on-bad-image",
        default="fail",
        choices=["skip", "fail"],
        help="an unreadable or missing image stops the run (fail) or is left out (skip)",
    )
    prep.add_argument(
        "--force",
        action="store_true",
        help="replace a different ChestXpert dataset at --out (its readers keep the old "
        "version until `data gc`); never anything else",
    )
    prep.add_argument(
        "--workers", type=int, default=None, help="decode processes (default: all cores)"
    )
    prep.add_argument(
        "--shard-rows",
        type=int,
        default=2000,
        help="images per Parquet shard (default 2000); a killed run keeps its finished shards",
    )
    prep.add_argument(
        "--compression",
        default="lz4",
        choices=["lz4", "zstd"],
        help="Parquet codec of the shards (default lz4): lz4 costs a trial's input far less CPU "
        "per image, zstd stores real films 2-10%% smaller",
    )
    prep.add_argument(
        "--s3-endpoint", default=None, help="S3-compatible endpoint URL (else AWS_ENDPOINT_URL…)"
    )
    prep.add_argument(
        "--on-cluster",
        action="store_true",
        help="decode on a Ray cluster's CPUs, one task per shard (--input and --out must be "
        "s3:// URIs; the digest is the same as a local prepare's)",
    )
    prep.add_argument(
        "--address",
        default=None,
        help="with --on-cluster: the Ray address (else RAY_ADDRESS, the local stack, in-process)",
    )
    prep.set_defaults(func=cmd_prepare)
    return data_sub
