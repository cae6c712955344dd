// Mix-of-Show for ComfyUI: frontend defaults for this pack's nodes.
//
// The frontend gives every INT input named "seed" a "control after generate" widget that starts at "randomize".
// For MoS Gradient Fusion and MoS Train ED-LoRA a new seed on every Run would redo minutes of fusion or training
// and change the result, so new nodes of this pack start at "fixed". Loaded workflows keep their saved value:
// nodeCreated runs before a node's saved widget values are restored.
import { app } from "../../../scripts/app.js";

app.registerExtension({
  name: "mixofshow.fixedSeeds",
  nodeCreated(node) {
    if (!node.comfyClass?.startsWith("MoS")) return;
    for (const widget of node.widgets ?? []) {
      if (widget.name === "control_after_generate") widget.value = "fixed";
    }
  },
});
