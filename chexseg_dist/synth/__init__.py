"""Phantom chest radiographs with exact masks, written as a CheXpert / CheXlocalize tree.

No real radiograph can be obtained where this project is tested, so every test, the demo and the experiments run on
these phantoms. They are built to behave like the real problem: a classifier must learn lung fields, the cardiac
silhouette and faint focal findings from image-level labels with CheXpert-like prevalence, co-occurrence, uncertain
and blank labels; subtle instances sit at noise-level contrast, so it is neither trivial nor hopeless.

Visual model. Everything is laid out in a patient frame ``(u, v)``: ``u`` runs across the thorax from -1 (image
left = patient right, as radiographs are displayed) to +1, ``v`` from 0 at the lung apices to 1 at the
costophrenic angles; an affine (shift, scale, rotation of a few degrees) maps it to pixels. The pixel value is a
sum of densities: air outside the body; soft tissue (torso, shoulders, arms, breasts); two hemithoraces whose air
darkens the image, minus the cardiomediastinal silhouette (mediastinum, aortic knob, heart; trachea as an air
column); ribs (posterior arcs with bright cortex, fainter anterior ribs), clavicles, spine with vertebral
banding, humeral heads; hilar vessels branching into lung markings and a fine parenchymal texture; a gastric
bubble under the left dome; then exposure (heel effect, window, gamma), quantum noise, and an R/L marker. Findings
change those densities and their masks are the pixels they change:

- Enlarged Cardiomediastinum: a widened upper mediastinum (half width from 0.13 to 0.25 of the hemithorax, normal
  0.09-0.16, so mild cases overlap); mask = mediastinum + heart (the expert masks include the heart, so it contains
  the Cardiomegaly mask). Cardiomegaly: cardiothoracic ratio from 0.48 to 0.68 (normal 0.37-0.52; AP views
  magnify the heart by 3-12%, as portable films do). Mask = heart.
- Lung Lesion: 1-3 round, slightly lobulated nodules or masses. Airspace Opacity: patchy, textured opacities
  (pneumonia-like), one or two clusters; its mask is the union of those patches and the Edema, Consolidation and
  Atelectasis opacities (CheXlocalize's Airspace Opacity covers any airspace opacity; CheXpert's Lung Opacity
  label is positive whenever one of them is), never lesions or effusions.
- Edema: bilateral perihilar ("bat-wing") haze with interstitial texture and blurred vessels. Consolidation:
  a dense region bounded by a lobe (fissures give sharp edges), sometimes with air bronchograms. Atelectasis:
  a plate-like band or a basal band along the diaphragm. Pneumothorax: an apical/lateral crescent of pure air
  without lung markings and a thin bright visceral pleural line. Pleural Effusion: dependent fluid with a
  lateral meniscus that blunts the costophrenic angle and hides the dome (or, on AP views, a layering veil).
- Support Devices: endotracheal tube, enteric tube, central lines (jugular, subclavian, PICC), pacemaker box and
  leads, ECG electrodes and wires, chest tubes; masks are the drawn strokes.
- Fracture draws a rib discontinuity and Pleural Other a thin lateral pleural thickening (label-only tasks, weak
  image evidence); Pneumonia is label-only and co-occurs with consolidation and patchy opacity.

Difficulty (seed 0, size 256): the 4-stage TinyCNN at 128 px, trained 25 epochs on 2000 train images with U-ones
labels and blanks as negatives, reaches test AUROC 0.89-0.97 on the localised observations except Lung Lesion
(~0.6 at 4% prevalence); after 10 epochs the mean is about 0.08 lower. Pneumonia and Fracture stay near 0.7.

Labels come from a small latent model (normal study, ICU/portable, heart failure, infection) tuned to CheXpert's
train prevalences. In train, negatives are mostly blank (not mentioned) or sometimes 0.0, and uncertain (-1.0)
labels mark a mix of faint present findings and absent ones; a 1.0 always has a drawn, non-empty mask. Valid and
test labels are certain (0/1), as in the expert-annotated CheXpert validation set.

Files: all splits are JPEG (CheXpert's release is JPEG, and the classifier must see the same compression in
training and evaluation; the masks are exact whatever the encoding). A few train frontals are 16-bit PNGs
(12-bit values, like DICOM exports) and a few are RGB JPEGs, so odd decoding paths are exercised. Polygons in
``gt_annotations_*.json`` are traced from the masks (:func:`chexseg_dist.data.chexlocalize.mask_to_polygons`), one set
per drawn object, so rasterising them gives the segmentation masks exactly.

Determinism: each study draws from ``SeedSequence(seed, spawn_key=(split, kind, index))``, so output is byte-identical
for the same seed and config, whatever the number of worker processes.

Modules, each importing only those before it: :mod:`~chexseg_dist.synth.labels` (which findings a study shows, and
its CheXpert label cells), :mod:`~chexseg_dist.synth.anatomy` (the patient, the patient frame, curve and raster
helpers, vessels and bones), :mod:`~chexseg_dist.synth.findings` (drawing each finding, and its masks),
:mod:`~chexseg_dist.synth.render` (a study's frontal image, masks and labels; the lateral view; image encoding) and
:mod:`~chexseg_dist.synth.writer` (patients and studies per split, worker processes, files: :func:`generate`).
"""

from chexseg_dist.synth.anatomy import Anatomy, sample_anatomy
from chexseg_dist.synth.labels import Study, sample_study
from chexseg_dist.synth.render import render_lateral, render_study
from chexseg_dist.synth.writer import DATASET_DIR, GENERATOR_VERSION, SPLITS, generate

__all__ = [
    "DATASET_DIR",
    "GENERATOR_VERSION",
    "SPLITS",
    "Anatomy",
    "Study",
    "generate",
    "render_lateral",
    "render_study",
    "sample_anatomy",
    "sample_study",
]
