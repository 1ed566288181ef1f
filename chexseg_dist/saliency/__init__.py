"""Saliency: all-class Grad-CAM in one backbone pass, and loading a classifier or ensemble to predict maps."""

from chexseg_dist.saliency.classifier import Loaded, LoadedEnsemble, load_classifier, predict_with_cams
from chexseg_dist.saliency.gradcam import cams_linear_head, grad_cam

__all__ = ["Loaded", "LoadedEnsemble", "cams_linear_head", "grad_cam", "load_classifier", "predict_with_cams"]
