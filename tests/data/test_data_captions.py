"""Caption strategies: textfile, filename, instanceprompt, parquet; prefixes and filters."""

from __future__ import annotations

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from data_builders import write_image

from kubetuner_trainer.data.captions import Captioner, apply_filters, load_filters
from kubetuner_trainer.data.dataset_config import DatasetConfigError, parse_dataset_config
from kubetuner_trainer.data.prepare import metadata_storage, prepare_dataset
from kubetuner_trainer.data.settings import DataSettings
from kubetuner_trainer.data.storage import LocalStorage


@pytest.fixture
def folder(tmp_path):
    root = tmp_path / "set"
    write_image(root / "a_red_fox.png", 64, 64)
    write_image(root / "deep/b-blue_bird.jpg", 64, 64, fmt="JPEG")
    write_image(root / "c.png", 64, 64)
    (root / "a_red_fox.txt").write_text("  a red fox\nin the snow  \n")
    (root / "deep/b-blue_bird.txt").write_text("a blue bird, watermark, photo")
    return root


def _captions(folder, **fields):
    entry = parse_dataset_config([{"id": "d", "instance_data_dir": str(folder), **fields}], DataSettings()).entries[0]
    captioner = Captioner(entry, LocalStorage(folder))
    return captioner.captions(["a_red_fox.png", "deep/b-blue_bird.jpg", "c.png"])


def test_textfile_reports_missing_caption_files(folder):
    captions, missing = _captions(folder, caption_strategy="textfile")
    assert captions == {"a_red_fox.png": "a red fox in the snow", "deep/b-blue_bird.jpg": "a blue bird, watermark, photo"}
    assert missing == [("c.png", "caption file c.txt is missing")]


def test_filename_and_instance_prompt(folder):
    captions, missing = _captions(folder, caption_strategy="filename")
    assert captions == {"a_red_fox.png": "a red fox", "deep/b-blue_bird.jpg": "b-blue bird", "c.png": "c"}
    assert not missing
    only, _ = _captions(folder, caption_strategy="instanceprompt", instance_prompt="sks animal")
    assert set(only.values()) == {"sks animal"}
    prefixed, _ = _captions(folder, caption_strategy="filename", instance_prompt="sks", prepend_instance_prompt=True)
    assert prefixed["a_red_fox.png"] == "sks a red fox"
    forced, _ = _captions(folder, caption_strategy="textfile", instance_prompt="sks", only_instance_prompt=True)
    assert set(forced.values()) == {"sks"} and len(forced) == 3


def test_filters_from_list_and_file(folder, tmp_path):
    captions, _ = _captions(folder, caption_strategy="textfile", caption_filter_list=[r",?\s*watermark", "s/photo/picture/"])
    assert captions["deep/b-blue_bird.jpg"] == "a blue bird, picture"
    rules = tmp_path / "filters.txt"
    rules.write_text("snow\n\ns/red/crimson/\n")
    assert apply_filters("a red fox in the snow", load_filters([str(rules)])) == "a crimson fox in the"


def test_parquet_captions_and_sizes_skip_header_reads(folder, tmp_path):
    table = pa.table({"id": ["a_red_fox", "b-blue_bird", "c"], "caption": ["fox from parquet", None, "c caption"],
                      "alt": ["", "bird fallback", ""], "w": [64, 64, 64], "h": [64, 64, 64]})
    pq.write_table(table, folder / "captions.parquet")
    settings = DataSettings(cache_dir=str(tmp_path / "cache"), resolution=64, aspect_bucket_alignment=16)
    entry = parse_dataset_config([{
        "id": "pq", "instance_data_dir": str(folder), "caption_strategy": "parquet",
        "parquet": {"path": "captions.parquet", "caption_column": "caption", "fallback_caption_column": "alt",
                    "width_column": "w", "height_column": "h"}}], settings).entries[0]
    prepared = prepare_dataset(entry, settings, metadata_store=metadata_storage(settings))
    assert prepared.captions == {"a_red_fox.png": "fox from parquet", "deep/b-blue_bird.jpg": "bird fallback",
                                 "c.png": "c caption"}
    assert prepared.discovery.probed == 0  # sizes came from the parquet columns


def test_parquet_with_unknown_column_is_a_config_error(folder, tmp_path):
    pq.write_table(pa.table({"id": ["c"], "caption": ["x"]}), folder / "captions.parquet")
    settings = DataSettings(cache_dir=str(tmp_path / "cache"))
    entry = parse_dataset_config([{"id": "pq", "instance_data_dir": str(folder), "caption_strategy": "parquet",
                                   "parquet": {"path": "captions.parquet", "caption_column": "text"}}],
                                 settings).entries[0]
    with pytest.raises(DatasetConfigError, match=r"datasets\[pq\].parquet.*no column 'text'; columns: caption, id"):
        prepare_dataset(entry, settings)


def test_caption_encodings_and_empty_files(tmp_path, caplog):
    root = tmp_path / "enc"
    names = ["bom", "utf16", "utf16le_nobom", "cp1252", "empty", "blank", "plain"]
    for name in names:
        write_image(root / f"{name}.png", 64, 64)
    (root / "bom.txt").write_bytes("\ufeffcafé au lait".encode())
    (root / "utf16.txt").write_text("a red fox", encoding="utf-16")
    (root / "utf16le_nobom.txt").write_bytes("a blue bird".encode("utf-16-le"))
    (root / "cp1252.txt").write_bytes("naïve “quoted” café".encode("cp1252"))
    (root / "empty.txt").write_bytes(b"")
    (root / "blank.txt").write_text("  \n\t \n")
    (root / "plain.txt").write_text("plain caption")
    entry = parse_dataset_config([{"id": "d", "instance_data_dir": str(root), "caption_strategy": "textfile"}],
                                 DataSettings()).entries[0]
    with caplog.at_level("WARNING", logger="kubetuner_trainer.data.captions"):
        captions, missing = Captioner(entry, LocalStorage(root)).captions([f"{n}.png" for n in names])
    assert not missing  # SimpleTuner trains images with empty caption files, with an empty caption
    assert captions == {"bom.png": "café au lait", "utf16.png": "a red fox", "utf16le_nobom.png": "a blue bird",
                        "cp1252.png": "naïve “quoted” café", "empty.png": "", "blank.png": "",
                        "plain.png": "plain caption"}
    messages = {r.getMessage() for r in caplog.records}
    assert f"caption file {root}/empty.txt: empty caption file; the image trains with an empty caption" in messages
    assert f"caption file {root}/blank.txt: empty caption file; the image trains with an empty caption" in messages
    assert any(m.startswith(f"caption file {root}/cp1252.txt: not valid UTF-8") for m in messages)
    assert not any(f"{root}/{n}.txt:" in m for m in messages for n in ("plain", "bom", "utf16"))
    prefixed, _ = _captions_of(root, ["empty.png"], instance_prompt="sks", prepend_instance_prompt=True)
    assert prefixed == {"empty.png": "sks"}


def _captions_of(root, keys, **fields):
    entry = parse_dataset_config([{"id": "d", "instance_data_dir": str(root), "caption_strategy": "textfile",
                                   **fields}], DataSettings()).entries[0]
    return Captioner(entry, LocalStorage(root)).captions(keys)


def test_files_without_captions_are_named_in_the_training_log(folder, tmp_path, caplog):
    entry = parse_dataset_config([{"id": "d", "instance_data_dir": str(folder), "caption_strategy": "textfile"}],
                                 DataSettings()).entries[0]
    with caplog.at_level("WARNING", logger="kubetuner_trainer.data.prepare"):
        prepare_dataset(entry, DataSettings(cache_dir=str(tmp_path / "cache")))
    assert "dataset d: leaving out c.png: caption file c.txt is missing" in {r.getMessage() for r in caplog.records}
