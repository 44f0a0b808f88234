#!/usr/bin/env bash
# Installs WordNet for nltk from Debian's packages where apt exists, into VENV/nltk_data.
# Optional by design: EDA falls back to swap/deletion with one warning when WordNet is absent,
# so every failure here is reported and swallowed.
venv="${1:-.venv}"
target="$venv/nltk_data/corpora/wordnet"
if [ -f "$target/lexnames" ] && [ -f "$target/data.noun" ]; then exit 0; fi
src=/usr/share/wordnet
if [ ! -f "$src/data.noun" ]; then
  if command -v apt-get >/dev/null 2>&1 && [ "$(id -u)" = 0 ]; then
    echo "installing WordNet from Debian (wordnet-base, wordnet-sense-index) ..."
    (apt-get install -y -q wordnet-base wordnet-sense-index >/dev/null 2>&1 \
      || { apt-get update -q >/dev/null 2>&1 && apt-get install -y -q wordnet-base wordnet-sense-index >/dev/null 2>&1; }) \
      || { echo "WordNet not installed (apt failed); EDA will run without synonyms"; exit 0; }
  else
    echo "WordNet not installed (no apt or not root); EDA will run without synonyms"; exit 0
  fi
fi
[ -f "$src/data.noun" ] || { echo "WordNet files not found in $src; EDA will run without synonyms"; exit 0; }
mkdir -p "$target"
cp -f "$src"/* "$target"/ 2>/dev/null
# nltk's reader needs `lexnames` (the lexicographer file names), which Debian does not ship.
if [ ! -f "$target/lexnames" ]; then
  python3 - "$target/lexnames" <<'PY'
import sys
names = """adj.all adj.pert adv.all noun.Tops noun.act noun.animal noun.artifact noun.attribute
noun.body noun.cognition noun.communication noun.event noun.feeling noun.food noun.group
noun.location noun.motive noun.object noun.person noun.phenomenon noun.plant noun.possession
noun.process noun.quantity noun.relation noun.shape noun.state noun.substance noun.time
verb.body verb.change verb.cognition verb.communication verb.competition verb.consumption
verb.contact verb.creation verb.emotion verb.motion verb.perception verb.possession verb.social
verb.stative verb.weather adj.ppl""".split()
syn = {"adj": 3, "adv": 4, "noun": 1, "verb": 2}
with open(sys.argv[1], "w") as f:
    for i, n in enumerate(names):
        f.write(f"{i:02d}\t{n}\t{syn[n.split('.')[0]]}\n")
PY
fi
echo "WordNet ready in $target"
