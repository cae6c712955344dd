"""Mix-of-Show for ComfyUI: ED-LoRA loading, layer-wise concept prompts, gradient fusion, regional sampling."""

WEB_DIRECTORY = "./web"


async def comfy_entrypoint():
    from .nodes import MixOfShowExtension, register_model_folders, register_prompt_checks

    register_model_folders()
    register_prompt_checks()
    return MixOfShowExtension()
