"""Synthetic chest radiographs ("phantoms") written in the NIH ChestX-ray14 layout.

`generate` draws frontal chest films with the 14 NIH findings and writes them exactly like the
NIH release (images_0NN/images/*.png, Data_Entry_2017.csv, BBox_List_2017.csv, train_val_list.txt,
test_list.txt), so the NIH adapter reads them with no special case. The modules, in the order a
film is made: `labels` (NIH label statistics), `plan` (who, which labels, which seeds),
`anatomy`, `textures`, `canvas`, `chest` and `findings` (what is painted), `radiograph` (one
film), `png` (encoding) and `write` (the dataset on disk).
"""

from chestxpert.datasets.synth.anatomy import FIELD_OF_VIEW_MM, Anatomy, sample_anatomy
from chestxpert.datasets.synth.canvas import BOX_LABELS, Box
from chestxpert.datasets.synth.labels import LABEL_RATES_PATH, load_label_rates, sample_label_sets
from chestxpert.datasets.synth.plan import PlannedImage, plan_dataset
from chestxpert.datasets.synth.png import png_bytes
from chestxpert.datasets.synth.radiograph import draw_radiograph
from chestxpert.datasets.synth.write import finding_labels, generate

__all__ = [
    "BOX_LABELS",
    "FIELD_OF_VIEW_MM",
    "LABEL_RATES_PATH",
    "Anatomy",
    "Box",
    "PlannedImage",
    "draw_radiograph",
    "finding_labels",
    "generate",
    "load_label_rates",
    "plan_dataset",
    "png_bytes",
    "sample_anatomy",
    "sample_label_sets",
]
