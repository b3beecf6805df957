// Greedy generation with transformers.js from a `--layout transformers.js` export, local files only.
//
//   node idefics3_generate.mjs MODEL_DIR CASES.json [DTYPE]
//
// DTYPE: fp32 (default), or q4 / q8 for the quantized variants (onnx/*_q4.onnx, *_quantized.onnx).
// CASES.json: [{"input_ids": [...], "pixel_values": [...] | null, "pixel_shape": [...] | null,
//               "max_new_tokens": n, "messages": [...] | null}]
// Prints one JSON line: for each case the generated token ids (prompt excluded) and, for cases
// with messages, the input ids transformers.js's own processor makes from them.
import fs from 'node:fs';
import path from 'node:path';
import { AutoProcessor, Idefics3ForConditionalGeneration, Tensor, env } from '@huggingface/transformers';

const [modelDir, casesPath, dtype = 'fp32'] = process.argv.slice(2);
env.allowRemoteModels = false;
env.allowLocalModels = true;
env.localModelPath = path.dirname(path.resolve(modelDir));
const id = path.basename(path.resolve(modelDir));

const model = await Idefics3ForConditionalGeneration.from_pretrained(id, { dtype, device: 'cpu' });
const processor = await AutoProcessor.from_pretrained(id);
const cases = JSON.parse(fs.readFileSync(casesPath, 'utf8'));
const results = [];
for (const c of cases) {
    const n = c.input_ids.length;
    const inputs = {
        input_ids: new Tensor('int64', BigInt64Array.from(c.input_ids.map(BigInt)), [1, n]),
        attention_mask: new Tensor('int64', new BigInt64Array(n).fill(1n), [1, n]),
    };
    if (c.pixel_values) {
        inputs.pixel_values = new Tensor('float32', Float32Array.from(c.pixel_values), c.pixel_shape);
    }
    const out = await model.generate({ ...inputs, max_new_tokens: c.max_new_tokens, do_sample: false });
    const result = { tokens: Array.from(out.data.slice(n), Number) };
    if (c.messages) {
        const text = processor.apply_chat_template(c.messages, { add_generation_prompt: true });
        // text only: the tokenizer (transformers.js 4.3.2's Idefics3Processor reads image rows
        // even when given no image)
        const own = await processor.tokenizer(text);
        result.processor_input_ids = Array.from(own.input_ids.data, Number);
    }
    results.push(result);
}
console.log(JSON.stringify(results));
