"""Detection metrics: KITTI 2D AP|R40 (devkit rules), VOC mAP@0.5, COCO mAP (faster-coco-eval), KITTI files."""
from aidkd.eval.coco_map import (
    COCO_METRIC_NAMES,
    coco_backend,
    coco_map,
    predictions_to_coco,
    records_to_coco,
    split_objects,
)
from aidkd.eval.evaluator import DetectionEvaluator, format_metrics_table, read_metrics, strict_json
from aidkd.eval.kitti_ap import (
    DIFFICULTIES,
    KITTI_CLASSES,
    MIN_OVERLAP,
    Detection,
    KittiAPResult,
    get_thresholds,
    kitti_ap_r40,
)
from aidkd.eval.kitti_io import (
    evaluate_kitti_dirs,
    evaluate_kitti_dirs_full,
    format_kitti_table,
    format_prediction_line,
    load_kitti_dirs,
    read_kitti_labels,
    read_kitti_predictions,
    write_kitti_predictions,
)
from aidkd.eval.voc import box_iou, voc_ap, voc_map

__all__ = [
    "COCO_METRIC_NAMES",
    "DIFFICULTIES",
    "KITTI_CLASSES",
    "MIN_OVERLAP",
    "Detection",
    "DetectionEvaluator",
    "KittiAPResult",
    "box_iou",
    "coco_backend",
    "coco_map",
    "evaluate_kitti_dirs",
    "evaluate_kitti_dirs_full",
    "format_kitti_table",
    "format_metrics_table",
    "format_prediction_line",
    "get_thresholds",
    "kitti_ap_r40",
    "load_kitti_dirs",
    "predictions_to_coco",
    "read_kitti_labels",
    "read_kitti_predictions",
    "read_metrics",
    "records_to_coco",
    "split_objects",
    "strict_json",
    "voc_ap",
    "voc_map",
    "write_kitti_predictions",
]
