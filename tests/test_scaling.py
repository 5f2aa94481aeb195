"""Scaling out on CPU: 2-process DDP (gloo) through train.py against one process with the same global batch."""

from tests.helpers.cli import FAST, ROOT, TINY, run_train
from tests.helpers.fault_injection import read_record, record_yaml

DDP_CPU = ROOT / "configs" / "trainer" / "ddp_cpu.yaml"


def test_ddp_two_processes_match_one_process_with_the_same_global_batch(tmp_path):
    common = [*FAST, "--trainer.max_steps=6", "--model.init_args.lr_decay_steps=6"]
    single, ddp = tmp_path / "single", tmp_path / "ddp"
    single.mkdir(), ddp.mkdir()
    # global batch 8: one process x 8, or two ranks x 4 (the sharded sampler splits the same 8 windows)
    run_train(
        single,
        "fit",
        "--config",
        str(TINY),
        "--config",
        str(record_yaml(single)),
        *common,
        "--data.init_args.batch_size=8",
    )
    run_train(
        ddp,
        "fit",
        "--config",
        str(TINY),
        "--config",
        str(DDP_CPU),
        "--config",
        str(record_yaml(ddp)),
        *common,
        "--data.init_args.batch_size=4",
        timeout=900,
    )
    one, rank0, rank1 = (
        read_record(single / "record"),
        read_record(ddp / "record", 0),
        read_record(ddp / "record", 1),
    )
    assert rank0["checksums"] == rank1["checksums"]  # DDP keeps the replicas identical
    for step in range(1, 7):  # and they follow the single-process run (float reduction order aside)
        assert abs(rank0["checksums"][step] - one["checksums"][step]) < 1e-3 * (
            1 + abs(one["checksums"][step])
        )
    mean_first_loss = (rank0["losses"][1] + rank1["losses"][1]) / 2
    assert abs(mean_first_loss - one["losses"][1]) < 1e-4  # the two halves of the same global batch
    # one run directory, one set of TensorBoard events, checkpoints written once (rank 0)
    runs = list((ddp / "lightning_logs").iterdir())
    assert [r.name for r in runs] == ["version_0"]
    assert len(list(runs[0].glob("events.out.tfevents.*"))) == 1
    assert (runs[0] / "checkpoints" / "last.ckpt").is_file()


NPT_FAST = [
    "--trainer.max_steps=4",
    "--trainer.val_check_interval=4",
    "--trainer.limit_val_batches=1",
    "--trainer.log_every_n_steps=1",
    "--trainer.enable_progress_bar=false",
    "--data.init_args.max_chars=150000",
    "--data.init_args.bpe_vocab_size=512",
    "--data.init_args.batch_size=2",
    "--data.init_args.block_size=32",
    "--data.init_args.num_workers=0",
    "--model.init_args.warmup_steps=2",
]


def test_ddp_two_processes_fit_npt(tmp_path):
    config = ROOT / "configs" / "npt" / "gpt_tiny.yaml"
    run_train(
        tmp_path,
        "fit",
        "--config",
        str(config),
        "--config",
        str(DDP_CPU),
        "--config",
        str(record_yaml(tmp_path)),
        *NPT_FAST,
        timeout=900,
    )
    rank0, rank1 = read_record(tmp_path / "record", 0), read_record(tmp_path / "record", 1)
    assert rank0["checksums"] == rank1["checksums"] and rank0["finite"]
    assert rank0["losses"] != rank1["losses"]  # each rank read different windows
    runs = list((tmp_path / "lightning_logs").iterdir())
    assert len(runs) == 1 and (runs[0] / "checkpoints" / "last.ckpt").is_file()
