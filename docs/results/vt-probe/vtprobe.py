import random, sys, torch
torch.set_num_threads(1)
from transformers import AutoModelForCausalLM
from apb.model.text import load_tokenizer, encode_document
import apb.tools.tasks as T
from apb.model.catalog import resolve_model
path = str(resolve_model("smollm2-135m-instruct"))
tok = load_tokenizer(path)
model = AutoModelForCausalLM.from_pretrained(path, torch_dtype=torch.bfloat16).eval()
n_tokens = int(sys.argv[1]); n_vars = int(sys.argv[2]); variant = sys.argv[3]; ndocs = int(sys.argv[4])
orig = T.vt_parts
Q = {
 "ruler": None,
 "which": "Which variables hold the value {value}? Answer with the variable names only, separated by spaces.",
 "list": "List every variable whose value is {value}, following the assignments. Answer with the names only.",
}
ph = T.CHAT
if Q[variant]:
    import dataclasses
    ph = dataclasses.replace(T.CHAT, vt_question=Q[variant])
    T.STYLES["chat"] = ("story", ph)
def vt(rng, n, used_values, used_names, spread=True, phrasing=T.CODE):
    return orig(rng, n_vars, used_values, used_names, spread=spread, phrasing=phrasing)
T.vt_parts = vt
ok = 0
for i in range(ndocs):
    rng = random.Random(1000 + i)
    ex = T.make_example("vt", n_tokens, tok, rng, i, style="chat")
    c, q = encode_document(tok, ex["context"], ex["question"])
    ids = torch.tensor([c + q])
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=64, do_sample=False)
    ans = tok.decode(out[0, ids.shape[1]:], skip_special_tokens=True)
    good = T.score(ans, T.expected("vt", ex["answer"]))
    ok += good
    print(i, good, repr(ex["answer"]), repr(ans[:240]), flush=True)
print("right", ok, "of", ndocs)
