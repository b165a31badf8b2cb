"""Manual check: napari with the napari-nninteractive plugin (remote mode) segments through ``nnunet_sam_serve``.

Needs napari, a Qt binding and napari-nninteractive (``pip install "napari[pyqt5]" napari-nninteractive``, not part of
the project's dependencies) and a display (e.g. ``xvfb-run``). Start the server, then::

    xvfb-run -a -s "-screen 0 1600x1000x24" python docs/napari_remote_check.py http://127.0.0.1:1527 \\
        CASE_0000.nii.gz OUT_FOLDER Z Y X

It opens the image, connects the plugin to the server in remote mode, initialises, places one positive point at
voxel (Z, Y, X) through the plugin's point layer (as a click does), waits for the mask and writes
``OUT_FOLDER/napari_window.png``; it prints the mask's voxel count and slices.
"""

from __future__ import annotations

import sys
import time

import napari
import numpy as np
import SimpleITK as sitk
from qtpy.QtWidgets import QApplication


def pump(seconds: float, until=None) -> bool:
    """Run the Qt event loop for up to ``seconds``, or until ``until()`` holds."""
    app, end = QApplication.instance(), time.time() + seconds
    while time.time() < end:
        app.processEvents()
        if until is not None and until():
            return True
        time.sleep(0.05)
    return False


def main(url: str, image_file: str, out: str, z: int, y: int, x: int) -> int:
    image = sitk.ReadImage(image_file)
    spacing = tuple(reversed(image.GetSpacing()))
    viewer = napari.Viewer(show=True)
    viewer.add_image(sitk.GetArrayFromImage(image), name="image", scale=spacing)
    _, widget = viewer.window.add_plugin_dock_widget("napari-nninteractive", "nnInteractive")
    pump(2)
    widget.server_url_edit.setText(url)
    widget.on_init()  # claims a session, uploads image and target buffer
    ready = pump(
        180,
        lambda: (
            widget.point_layer_name in viewer.layers
            and widget.session is not None
            and widget.session.target_buffer is not None
        ),
    )
    if not ready:
        print("the plugin did not initialise against the server")
        return 1
    pump(3)
    viewer.dims.set_point(0, z * spacing[0])
    viewer.layers[widget.point_layer_name].add(np.array([z, y, x], dtype=float))
    labels = viewer.layers[widget.label_layer_name]
    if not pump(180, lambda: np.asarray(labels.data).any()):
        print("no mask came back")
        return 1
    mask = np.asarray(labels.data).astype(bool)
    print(f"mask: {int(mask.sum())} voxels on slices {np.flatnonzero(mask.any((1, 2))).tolist()}")
    pump(3)
    viewer.screenshot(f"{out}/napari_window.png", canvas_only=False)
    viewer.close()
    return 0


if __name__ == "__main__":
    sys.exit(main(*sys.argv[1:4], *(int(v) for v in sys.argv[4:7])))
