"""Tasks: named image-classification datasets with train / validation / test splits.

Two sources:

* a local folder of ``<name>.npz`` files (format of the data README: ``x_train``/``y_train``/``x_test``/``y_test``
  uint8 HWC images and int64 labels, ``classes``). The folder is configuration: the ``data_dir`` argument,
  ``--data DIR`` on the command line, or the ``QVEC_DATA`` environment variable;
* the 22 paper tasks (SPEC section 5) through Hugging Face ``datasets``, by paper name (``MNIST``, ``hf:GTSRB``) or
  by dataset id (``hf:ylecun/mnist``). ``hf_root`` (or ``QVEC_HF_ROOT``) points at a local mirror where dataset
  ``owner/name`` was saved with ``DatasetDict.save_to_disk`` under ``<root>/owner/name``.

One module per job, all re-exported here (import from ``qvec.tasks``):

* :mod:`~qvec.tasks.catalogue`: which tasks exist and where their data lives (the paper table, name aliases, the
  data folder, :func:`locate_task`), without decoding anything;
* :mod:`~qvec.tasks.splits`: :class:`Task`, the :class:`TaskSplit` kinds and the SPEC validation rule
  (:func:`validation_indices`);
* :mod:`~qvec.tasks.loaders`: readers for task ``.npz`` files, Hugging Face datasets and the JPEG pretraining
  corpus;
* :mod:`~qvec.tasks.registry`: :func:`get_task`, name -> loaded task, once per process;
* :mod:`~qvec.tasks.transforms`: :func:`resize_batch` and :func:`normalize`, a model's preprocessing.
"""

from qvec.core.lazy import lazy_exports

# Names are imported on first use (PEP 562), so that the catalogue (which tasks exist) loads without torch.
_EXPORTS = {
    "DATA_ENV": "qvec.data.tasks.catalogue",
    "HF_ROOT_ENV": "qvec.data.tasks.catalogue",
    "PAPER_TASKS": "qvec.data.tasks.catalogue",
    "PaperTask": "qvec.data.tasks.catalogue",
    "TaskInfo": "qvec.data.tasks.catalogue",
    "list_tasks": "qvec.data.tasks.catalogue",
    "local_task_files": "qvec.data.tasks.catalogue",
    "locate_task": "qvec.data.tasks.catalogue",
    "paper_task": "qvec.data.tasks.catalogue",
    "resolve_data_dir": "qvec.data.tasks.catalogue",
    "check_data_dir": "qvec.data.tasks.catalogue",
    "task_summaries": "qvec.data.tasks.catalogue",
    "NPZ_ARRAYS": "qvec.data.tasks.loaders",
    "load_hf_task": "qvec.data.tasks.loaders",
    "load_jpeg_corpus": "qvec.data.tasks.loaders",
    "load_npz_task": "qvec.data.tasks.loaders",
    "get_task": "qvec.data.tasks.registry",
    "SPLITS": "qvec.data.tasks.splits",
    "VAL_FRACTION": "qvec.data.tasks.splits",
    "VAL_MAX": "qvec.data.tasks.splits",
    "VAL_SEED": "qvec.data.tasks.splits",
    "ArraySplit": "qvec.data.tasks.splits",
    "HFSplit": "qvec.data.tasks.splits",
    "SplitName": "qvec.data.tasks.splits",
    "SubsetSplit": "qvec.data.tasks.splits",
    "Task": "qvec.data.tasks.splits",
    "TaskSplit": "qvec.data.tasks.splits",
    "validation_indices": "qvec.data.tasks.splits",
    "normalize": "qvec.data.tasks.transforms",
    "resize_batch": "qvec.data.tasks.transforms",
}


__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)


__all__ = [
    "DATA_ENV",
    "HF_ROOT_ENV",
    "NPZ_ARRAYS",
    "PAPER_TASKS",
    "SPLITS",
    "VAL_FRACTION",
    "VAL_MAX",
    "VAL_SEED",
    "ArraySplit",
    "HFSplit",
    "PaperTask",
    "SplitName",
    "SubsetSplit",
    "Task",
    "TaskInfo",
    "TaskSplit",
    "get_task",
    "list_tasks",
    "load_hf_task",
    "load_jpeg_corpus",
    "load_npz_task",
    "local_task_files",
    "locate_task",
    "normalize",
    "paper_task",
    "resize_batch",
    "resolve_data_dir",
    "check_data_dir",
    "task_summaries",
    "validation_indices",
]
