"""InpaintCropAroundMask + InpaintStitch: LAR-Gen's zoom-in, inpaint a context window at the model's size."""
from __future__ import annotations

from comfy_api.latest import io

from faithful_inpaint.kernels import crop as crop_ops
from faithful_inpaint.kernels import masks as mask_ops
from faithful_inpaint.patching.errors import NodeInputError
from faithful_inpaint.patching.inputs import check_image, check_mask

CROP_ID = "InpaintCropAroundMask"
STITCH_ID = "InpaintStitch"
CATEGORY = "inpaint/faithful/zoom-in"

# What InpaintStitch needs to put the crops back (a kernels.crop.CropPlan).
Stitch = io.Custom("FAITHFUL_STITCH")


class InpaintCropAroundMask(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id=CROP_ID,
            display_name="Inpaint Crop Around Mask (zoom-in)",
            category=CATEGORY,
            description="Crops a context window around the mask (its bounding box plus padding) and resizes it to "
                        "the model's working size, so a small region is inpainted at full resolution. Inpaint the "
                        "crop as usual, then put it back with Inpaint Stitch.",
            inputs=[
                io.Image.Input("image"),
                io.Mask.Input("mask", tooltip="1 = region to inpaint; same size as the image. One mask, or one per "
                                              "image (each image gets a window around its own mask)."),
                io.Int.Input("padding", default=32, min=0, max=4096, step=1,
                             tooltip="Context kept around the mask's bounding box, in image pixels per side."),
                io.Int.Input("long_side", default=512, min=0, max=8192, step=8,
                             tooltip="Long side of the crop in pixels: the model's working size (512 for SD1.5, "
                                     "1024 for SDXL). 0 = no resizing (the window is only grown to multiples "
                                     "of 8)."),
            ],
            outputs=[
                io.Image.Output(display_name="image", tooltip="The context window at the working size."),
                io.Mask.Output(display_name="mask", tooltip="The mask of the window at the working size."),
                Stitch.Output(display_name="stitch", tooltip="Where each crop came from; connect to Inpaint Stitch."),
            ],
        )

    @classmethod
    def execute(cls, image, mask, padding: int, long_side: int) -> io.NodeOutput:
        check_image(CROP_ID, "image", image)
        m = check_mask(CROP_ID, "mask", mask)
        if tuple(m.shape[-2:]) != tuple(image.shape[1:3]):
            raise NodeInputError(CROP_ID, "mask", f"the mask is {m.shape[-1]}x{m.shape[-2]} px but the image is "
                                 f"{image.shape[2]}x{image.shape[1]} px; resize one of them first.")
        batch = max(m.shape[0], image.shape[0])
        for n, name in ((m.shape[0], "mask"), (image.shape[0], "image")):
            if n != 1 and batch % n:
                raise NodeInputError(CROP_ID, name, f"batch of {n} does not match the other input's batch of "
                                                    f"{batch}; give 1 or {batch}.")
        if not bool((m > 0).any()):
            raise NodeInputError(CROP_ID, "mask", "the mask is empty, so there is nothing to crop around; draw the "
                                                  "region to inpaint (white) in the mask.")
        cplan = crop_ops.plan(mask_ops.match_batch(m, batch), padding, long_side)
        crops, crop_masks = crop_ops.crop(image, cplan)
        return io.NodeOutput(crops, crop_masks, cplan)


class InpaintStitch(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id=STITCH_ID,
            display_name="Inpaint Stitch (zoom-in)",
            category=CATEGORY,
            description="Puts inpainted crops from Inpaint Crop Around Mask back into the original image with a "
                        "feathered blend. Pixels outside the crop window stay exactly the original.",
            inputs=[
                Stitch.Input("stitch"),
                io.Image.Input("original", tooltip="The image given to Inpaint Crop Around Mask."),
                io.Image.Input("inpainted", tooltip="The inpainted crop (any size: it is resized to its window). "
                                                    "A batch of results from one crop gives one image each."),
                io.Int.Input("feather", default=8, min=0, max=256,
                             tooltip="Width in pixels of the soft transition outside the mask (0 = hard edge). "
                                     "Keep it below the crop's padding."),
            ],
            outputs=[io.Image.Output(display_name="image")],
        )

    @classmethod
    def execute(cls, stitch, original, inpainted, feather: int) -> io.NodeOutput:
        if not isinstance(stitch, crop_ops.CropPlan):
            raise NodeInputError(STITCH_ID, "stitch", "connect the 'stitch' output of Inpaint Crop Around Mask.")
        try:
            return io.NodeOutput(crop_ops.stitch(original, inpainted, stitch, feather))
        except ValueError as err:
            name = "original" if "original" in str(err) else "inpainted"
            raise NodeInputError(STITCH_ID, name, str(err))


NODES = [InpaintCropAroundMask, InpaintStitch]
