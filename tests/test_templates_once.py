"""The templates' `once(key)` (sitegen/site/build.py): a block every page of a model shares is
rendered the first time its key is seen in a build and reused after; other keys render apart."""

from __future__ import annotations

from sitegen.site.build import _environment


def test_once_renders_a_block_once_per_key():
    env = _environment({"style.css": "/s.css", "app.js": "/a.js"})
    calls = []
    page = env.from_string('{% call once("rows " ~ name) %}<b>{{ count(name) }}</b>{% endcall %}|')

    def count(name):
        calls.append(name)
        return len(calls)

    first = [page.render(name=n, count=count) for n in ("a", "a", "b", "a", "b")]
    assert first == ["<b>1</b>|", "<b>1</b>|", "<b>2</b>|", "<b>1</b>|", "<b>2</b>|"]
    assert calls == ["a", "b"]
    # escaping is the block's own: a value with markup comes out escaped, once or not
    assert env.from_string('{% call once("x") %}{{ v }}{% endcall %}').render(v="<i>") == "&lt;i&gt;"
    # a new build (a new environment) starts empty
    assert (
        _environment({"style.css": "/s.css", "app.js": "/a.js"})
        .from_string('{% call once("rows a") %}{{ count("a") }}{% endcall %}')
        .render(count=count)
        == "3"
    )
