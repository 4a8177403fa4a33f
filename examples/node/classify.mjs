// Classify an image with an ONNX model exported by `imgclf export`, from Node.js.
//
//   npm install --ignore-scripts        (onnxruntime-node's CPU binary ships in the package)
//   node classify.mjs model.onnx photo.jpg
//
// Prints the line `imgclf predict` prints: file <TAB> label <TAB> probability <TAB> known
// ("known", "unknown", or "-" for a model without an unknown-input detector); for a
// multi-label model, the labels over their thresholds joined by ";" and their probabilities
// likewise. The labels, thresholds and preprocessing come from the model file's own
// metadata (key "imgclf"), so nothing else is needed.
import { readFileSync } from "node:fs";
import ort from "onnxruntime-node";
import sharp from "sharp";

// ModelProto.metadata_props is field 14: entries with key (1) and value (2).
function readMetadata(bytes) {
  let pos = 0;
  const varint = () => {
    let result = 0n, shift = 0n, b;
    do { b = bytes[pos++]; result |= BigInt(b & 0x7f) << shift; shift += 7n; } while (b & 0x80);
    return Number(result);
  };
  const entries = {};
  while (pos < bytes.length) {
    const tag = varint(), field = tag >> 3, wire = tag & 7;
    if (wire === 0) { varint(); continue; }
    if (wire === 1) { pos += 8; continue; }
    if (wire === 5) { pos += 4; continue; }
    const len = varint(), end = pos + len;   // wire type 2: length-delimited
    if (field === 14) {
      const entry = {}; const save = pos;
      while (pos < end) { const t = varint(), n = varint(); entry[t >> 3] = bytes.toString("utf8", pos, pos + n); pos += n; }
      entries[entry[1]] = entry[2]; pos = save;
    }
    pos = end;
  }
  return entries;
}

// The network's input: the centre crop, or (frame "whole", multi-label models) the whole
// image resized to the square, or to input_shape [height, width] where it has one.
async function toInput(file, prep) {
  const size = prep.input_size;
  const [height, width] = prep.input_shape ?? [size, size];
  let image;
  if (prep.frame === "whole") {
    image = sharp(file).rotate().removeAlpha().resize(width, height, { fit: "fill", kernel: "cubic" });
  } else {
    const resizeTo = Math.floor(size / prep.crop_pct);
    const { width, height } = await sharp(file).rotate().metadata().then((m) =>
      m.orientation >= 5 ? { width: m.height, height: m.width } : m);
    const scale = resizeTo / Math.min(width, height);
    const w = Math.max(resizeTo, Math.floor(width * scale)), h = Math.max(resizeTo, Math.floor(height * scale));
    image = sharp(file).rotate().removeAlpha().resize(w, h, { kernel: "cubic" })
      .extract({ left: Math.round((w - size) / 2), top: Math.round((h - size) / 2), width: size, height: size });
  }
  const { data } = await image.raw().toBuffer({ resolveWithObject: true });
  const pixels = height * width, out = new Float32Array(3 * pixels);
  for (let i = 0; i < pixels; i++)
    for (let c = 0; c < 3; c++)
      out[c * pixels + i] = (data[i * 3 + c] / 255 - prep.mean[c]) / prep.std[c];
  return new ort.Tensor("float32", out, [1, 3, height, width]);
}

const [modelPath, imagePath] = process.argv.slice(2);
if (!modelPath || !imagePath) { console.error("usage: node classify.mjs model.onnx image.jpg"); process.exit(2); }
const meta = readMetadata(readFileSync(modelPath)).imgclf;
if (!meta) { console.error(`${modelPath}: no imgclf metadata; export it with 'imgclf export'`); process.exit(2); }
const config = JSON.parse(meta);
const session = await ort.InferenceSession.create(modelPath);
const result = await session.run({ [config.input.name]: await toInput(imagePath, config.preprocessing) });
const probs = result[config.output.name].data;
// A model with an unknown-input detector has a second output: known is score <= threshold.
const score = config.unknown ? result["unknown_score"].data[0] : undefined;
const known = score === undefined ? "-" : score <= config.unknown.threshold ? "known" : "unknown";
if (config.multilabel) {  // sigmoid probabilities: each label from its own threshold, most likely first
  const order = [...probs.keys()].sort((a, b) => probs[b] - probs[a]);
  const on = order.filter((i) => probs[i] >= config.multilabel.thresholds[i]);
  console.log([imagePath, on.map((i) => config.labels[i]).join(";"), on.map((i) => probs[i].toFixed(4)).join(";"),
               known].join("\t"));
} else {
  let best = 0;
  for (let i = 1; i < probs.length; i++) if (probs[i] > probs[best]) best = i;
  console.log([imagePath, config.labels[best], probs[best].toFixed(4), known].join("\t"));
}
