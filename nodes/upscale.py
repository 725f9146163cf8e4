"""InpaintConditionalUpscale: ProFI-Painter's inpainting-specialised conditional super-resolution (appendix E).

The x4 upscaler conditioned on the low-resolution inpainted result, its predicted x0 blended with the original
outside the mask after every step, the result Poisson-blended into the original (patching/upscale.py).
"""
from __future__ import annotations

from comfy_api.latest import io

from faithful_inpaint.kernels import sr_blend
from faithful_inpaint.patching.inputs import check_choice
from faithful_inpaint.patching.upscale import NODE_ID, VAE_TILING, conditional_upscale


class InpaintConditionalUpscale(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id=NODE_ID,
            display_name="Inpaint Conditional Upscale (x4, ProFI-Painter)",
            category="inpaint/faithful/ProFI-Painter",
            description="Brings a low-resolution inpainting result to the original's resolution with the SD x4 "
                        "upscaler, borrowing fine detail from the original's known region at every step, then "
                        "Poisson-blends it into the original (ProFI-Painter appendix E). Pixels outside the blend "
                        "region stay exactly the original.",
            inputs=[
                io.Model.Input("model", tooltip="The MODEL of the Stable Diffusion x4 upscaler checkpoint."),
                io.Vae.Input("vae", tooltip="The VAE of the same x4 upscaler checkpoint (4x, not the usual 8x)."),
                io.Conditioning.Input("positive", tooltip="Text conditioning from the x4 checkpoint's CLIP; the "
                                      "reference appends ', high resolution professional photo' to the prompt."),
                io.Conditioning.Input("negative"),
                io.Image.Input("image", tooltip="The original high-resolution image (the output size)."),
                io.Mask.Input("mask", tooltip="1 = inpainted region; resized to the image size."),
                io.Image.Input("low_res", tooltip="The inpainted low-resolution result (e.g. 512 px); resized to "
                                                  "a quarter of the image size when it is not already."),
                io.Int.Input("seed", default=0, min=0, max=0xffffffffffffffff, control_after_generate=True),
                io.Int.Input("steps", default=20, min=1, max=1000, tooltip="DDIM steps (timesteps 999, 999 - "
                                                                           "1000 // steps, ...)."),
                io.Float.Input("cfg", default=7.5, min=0.0, max=100.0, step=0.1, round=0.01),
                io.Int.Input("noise_level", default=20, min=0, max=sr_blend.NOISE_LEVEL_MAX,
                             tooltip="Noise augmentation of the low-res conditioning, out of 350 (as "
                                     "SD_4XUpscale_Conditioning's noise_augmentation x 350)."),
                io.Int.Input("mask_dilation", default=sr_blend.REFERENCE_MASK_DILATION, min=0, max=512,
                             tooltip="Growth of the x0-blend mask in image pixels (reference: 19 iterations of a "
                                     "3x3 dilation)."),
                io.Int.Input("mask_blur", default=sr_blend.REFERENCE_MASK_BLUR, min=1, max=99, step=2,
                             tooltip="Gaussian kernel size (latent pixels, odd) of the x0-blend mask."),
                io.Int.Input("poisson_dilation", default=sr_blend.REFERENCE_POISSON_DILATION, min=1, max=512,
                             tooltip="Side of the square kernel that grows the mask for the Poisson blend (48: "
                                     "about 24 px each way); outside it every pixel is the original."),
                io.Int.Input("poisson_padding", default=sr_blend.REFERENCE_POISSON_PADDING, min=1, max=512,
                             tooltip="Reflect padding (px) around the images during the Poisson blend."),
                io.Combo.Input("vae_tiling", options=list(VAE_TILING), default="auto",
                               tooltip="Tiled VAE encode/decode: auto = above 1024 x 1024 px (needed for 2048 px "
                                       "on 24 GB GPUs)."),
                io.Int.Input("tile_size", default=512, min=128, max=4096, step=32,
                             tooltip="VAE tile size in image pixels when tiling."),
            ],
            outputs=[
                io.Image.Output(display_name="image"),
                io.Image.Output(display_name="blend_masks",
                                tooltip="Red: the mask; green: the x0-blend mask (upscaled from latent size); "
                                        "blue: the Poisson blend region."),
            ],
        )

    @classmethod
    def execute(cls, model, vae, positive, negative, image, mask, low_res, seed, steps, cfg, noise_level,
                mask_dilation, mask_blur, poisson_dilation, poisson_padding, vae_tiling, tile_size
                ) -> io.NodeOutput:
        check_choice(NODE_ID, "vae_tiling", vae_tiling, VAE_TILING)
        result = conditional_upscale(
            model, vae, positive, negative, image, mask, low_res, seed=seed, steps=steps, cfg=cfg,
            noise_level=noise_level, mask_dilation=mask_dilation, mask_blur=mask_blur,
            poisson_dilation=poisson_dilation, poisson_padding=poisson_padding, vae_tiling=vae_tiling,
            tile_size=tile_size)
        return io.NodeOutput(result.image, result.preview)


NODES = [InpaintConditionalUpscale]
