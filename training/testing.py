"""A small real model repository for tests of every part (inference, gateway, deploy): trained for one epoch on a
small subset of real radiographs at 64x64, exported exactly as `cxr export` does.

    build_test_repository(data_dir, out_dir) -> out_dir/model_repository with
        custom_cnn/1, custom_cnn/2   two versions (1 and 2 epochs: different weights, same split)
        mobilenet/1, resnet50/1
        ensemble/1                   one graph averaging custom_cnn (v1's run), mobilenet and resnet50

Every model: input `image` uint8 [N,1,64,64], outputs probabilities/logits [N,3], cam [N,3,2,2], ood_score [N,1]. Tiny training:
the accuracy is low and means nothing; the files, layout and graphs are real.
"""

from __future__ import annotations

from pathlib import Path

TEST_IMAGE_SIZE = 64
TEST_IMAGES_PER_CLASS = 30


def build_test_repository(data_dir: str | Path, out_dir: str | Path) -> Path:
    from training.evaluate import evaluate_ensemble, evaluate_run
    from training.export import export_ensemble, export_run
    from training.train import TrainConfig, train

    out_dir = Path(out_dir)
    repo = out_dir / "model_repository"
    runs = {}
    for key, arch, epochs in (
        ("custom_cnn", "custom_cnn", 1),
        ("custom_cnn_v2", "custom_cnn", 2),
        ("mobilenet", "mobilenet", 1),
        ("resnet50", "resnet50", 1),
    ):
        cfg = TrainConfig(
            data=str(Path(data_dir).resolve()),
            architecture=arch,
            image_size=TEST_IMAGE_SIZE,
            epochs=epochs,
            max_per_class=TEST_IMAGES_PER_CLASS,
            batch_size=16,
            seed=0,
        )
        runs[key] = out_dir / "runs" / key
        train(cfg, runs[key], resume=False)
        evaluate_run(runs[key], plots=False)  # fits what export packages: temperature, operating point, input gate
    members = [runs["custom_cnn"], runs["mobilenet"], runs["resnet50"]]
    evaluate_ensemble(members, out_dir / "runs" / "ensemble", plots=False)
    export_run(runs["custom_cnn"], repo)
    export_run(runs["custom_cnn_v2"], repo, "custom_cnn")
    export_run(runs["mobilenet"], repo)
    export_run(runs["resnet50"], repo)
    export_ensemble(members, repo, evaluation=out_dir / "runs" / "ensemble")
    return repo


if __name__ == "__main__":  # python -m training.testing DATA OUT: build one by hand
    import sys

    print(build_test_repository(sys.argv[1], sys.argv[2]))
